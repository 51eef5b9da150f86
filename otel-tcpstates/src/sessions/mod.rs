//! In: decoded kernel records. Out: session updates (a state a socket left, a
//! session that ended), with each socket's owner, container, links, the
//! incidents in each state and the reason a connection failed.
//! It knows nothing of OpenTelemetry or of how updates are printed.
pub mod container;
pub mod container_lookups;
pub mod incidents;
pub mod links;
pub mod outcome;
pub mod requests;
pub mod table;
