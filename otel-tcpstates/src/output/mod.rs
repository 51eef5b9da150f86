//! Output formats. Each takes decoded events and writes them somewhere.
pub mod text;
