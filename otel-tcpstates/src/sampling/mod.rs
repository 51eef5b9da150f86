//! In: session updates, every one. Out: the updates of the traces kept, each with
//! what its spans carry of the decision (`th`, the rules that kept it), and counts
//! of what was left out. Whole sessions are kept or left out: by consistent
//! probability on the trace id, or by keep rules decided when the session ends.
//! It knows nothing of spans' encoding, nor of the metrics counted from every
//! session before it.
pub mod decision;
pub mod rules;
pub mod settings;
pub mod threshold;
