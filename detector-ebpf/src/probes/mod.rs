//! Hook bodies. Entry points live in `main.rs`; each function here returns
//! `Result` so the entry point can stay one line and always fail open.
pub mod connect;
pub mod floor;
pub mod ondemand;
pub mod process;
pub mod sendrecv;
pub mod socket;
pub mod stack;
pub mod tcp;
pub mod tls;
