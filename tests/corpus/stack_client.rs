//! A retry loop for the call-stack tests: connects to 127.0.0.1:PORT again
//! and again for SECONDS (at most 2,000,000 times) through std's
//! TcpStream, from a function with a name no library has. Built by
//! tests/tests/stacks.rs with `-C force-frame-pointers=yes -g`.
use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

#[inline(never)]
fn storm_retry_connect_loop(port: u16, secs: u64) -> u64 {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut n = 0;
    while Instant::now() < end && n < 2_000_000 {
        let r = TcpStream::connect(addr); // THE CONNECT
        std::hint::black_box(&r);
        n += 1;
    }
    n
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = args[1].parse().expect("port");
    let secs = args[2].parse().expect("seconds");
    println!("{}", storm_retry_connect_loop(port, secs));
}
