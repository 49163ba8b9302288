//! stormguard's enforcement programs, a separate object from the sensors:
//! the daemon loads and attaches it only while a budget exists, so the
//! default `observe` mode runs none of this code. Every decision fails
//! open: no budget, an expired budget, a protected caller or any error
//! allows the connect.
#![no_std]
#![no_main]

mod budget;
#[path = "../sockaddr.rs"]
mod sockaddr;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext},
};
use detector_common::{AF_INET, AF_INET6};

const ALLOW: i32 = 1;
/// With `bpf_set_retval` already called: fail the connect with that errno.
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn sg_enforce_connect4(ctx: SockAddrContext) -> i32 {
    budget::connect(&ctx, AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn sg_enforce_connect6(ctx: SockAddrContext) -> i32 {
    budget::connect(&ctx, AF_INET6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sg_enforce_sendmsg4(ctx: SockAddrContext) -> i32 {
    budget::sendmsg(&ctx, AF_INET)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sg_enforce_sendmsg6(ctx: SockAddrContext) -> i32 {
    budget::sendmsg(&ctx, AF_INET6)
}

/// Every packet leaving a socket: governed sockets' requests beyond their
/// budget leave later. Always passes the packet (1).
#[cgroup_skb]
pub fn sg_enforce_egress(ctx: SkBuffContext) -> i32 {
    budget::egress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
