//! In: decoded kernel records. Out: session updates (a state a socket left, a
//! session that ended), with each socket's owner, container and links.
//! It knows nothing of OpenTelemetry or of how updates are printed.
pub mod container;
pub mod links;
pub mod table;
