//! Ring-buffer records become observations: typed, owned, clock-stamped
//! facts the rest of the program works with. Also the process table that
//! names the pids in them.
pub mod bounded;
pub mod decode;
pub mod failure;
pub mod procs;
pub mod reply;
pub mod service;

pub use bounded::TableUsage;
pub use decode::{Comm, ConnectOutcome, DecodeError, Destination, Observation, Proto, decode};
pub use reply::Reply;
