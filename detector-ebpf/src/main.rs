//! stormguard's kernel programs. Entry points only: each calls its body in
//! `probes/` and fails open — a tracepoint returns 0 whatever happens (no
//! perf sample), a cgroup hook always allows the connect or send.
#![no_std]
#![no_main]

mod maps;
mod probes;
mod sockaddr;
mod tables;
mod util;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, fexit, raw_tracepoint, tracepoint, uprobe, uretprobe},
    programs::{
        FExitContext, ProbeContext, RawTracePointContext, RetProbeContext, SockAddrContext,
        SockContext, TracePointContext,
    },
};
use detector_common::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

use probes::{connect, ondemand, process, sendrecv, socket, tcp, tls};
use tables::check;

const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sg_connect4(ctx: SockAddrContext) -> i32 {
    check!("sg_connect4", connect::connect(&ctx, AF_INET));
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sg_connect6(ctx: SockAddrContext) -> i32 {
    check!("sg_connect6", connect::connect(&ctx, AF_INET6));
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sg_sendmsg4(ctx: SockAddrContext) -> i32 {
    check!("sg_sendmsg4", connect::sendmsg(&ctx, AF_INET));
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sg_sendmsg6(ctx: SockAddrContext) -> i32 {
    check!("sg_sendmsg6", connect::sendmsg(&ctx, AF_INET6));
    ALLOW
}

/// A socket is released (close of its last descriptor): its per-socket
/// state goes with it, before the kernel can reuse its address.
#[cgroup_sock(sock_release)]
pub fn sg_sock_release(ctx: SockContext) -> i32 {
    socket::release(&ctx);
    ALLOW
}

#[tracepoint]
pub fn sg_set_state(ctx: TracePointContext) -> u32 {
    check!("sg_set_state", tcp::set_state(&ctx));
    0
}

#[tracepoint]
pub fn sg_error_report(ctx: TracePointContext) -> u32 {
    check!("sg_error_report", tcp::error_report(&ctx));
    0
}

#[tracepoint]
pub fn sg_recv_reset(ctx: TracePointContext) -> u32 {
    check!("sg_recv_reset", tcp::receive_reset(&ctx));
    0
}

#[tracepoint]
pub fn sg_retransmit(ctx: TracePointContext) -> u32 {
    check!("sg_retransmit", tcp::retransmit(&ctx));
    0
}

#[tracepoint]
pub fn sg_send_length(ctx: TracePointContext) -> u32 {
    check!("sg_send_length", sendrecv::send_length(&ctx));
    0
}

#[tracepoint]
pub fn sg_recv_length(ctx: TracePointContext) -> u32 {
    check!("sg_recv_length", sendrecv::recv_length(&ctx));
    0
}

// Kernels before 6.3 have no sock_send_length/sock_recv_length: the
// loader attaches these instead (see probes/sendrecv.rs).

#[fexit(function = "tcp_sendmsg")]
pub fn sg_tcp_sendmsg(ctx: FExitContext) -> i32 {
    check!(
        "sg_tcp_sendmsg",
        sendrecv::sendmsg_exit(&ctx, IPPROTO_TCP, false),
    );
    0
}

#[fexit(function = "udp_sendmsg")]
pub fn sg_udp_sendmsg(ctx: FExitContext) -> i32 {
    check!(
        "sg_udp_sendmsg",
        sendrecv::sendmsg_exit(&ctx, IPPROTO_UDP, false),
    );
    0
}

#[fexit(function = "udpv6_sendmsg")]
pub fn sg_udpv6_sendmsg(ctx: FExitContext) -> i32 {
    check!(
        "sg_udpv6_sendmsg",
        sendrecv::sendmsg_exit(&ctx, IPPROTO_UDP, true),
    );
    0
}

#[fexit(function = "tcp_recvmsg")]
pub fn sg_tcp_recvmsg(ctx: FExitContext) -> i32 {
    check!(
        "sg_tcp_recvmsg",
        sendrecv::recvmsg_exit(&ctx, IPPROTO_TCP, false),
    );
    0
}

#[fexit(function = "udp_recvmsg")]
pub fn sg_udp_recvmsg(ctx: FExitContext) -> i32 {
    check!(
        "sg_udp_recvmsg",
        sendrecv::recvmsg_exit(&ctx, IPPROTO_UDP, false),
    );
    0
}

#[fexit(function = "udpv6_recvmsg")]
pub fn sg_udpv6_recvmsg(ctx: FExitContext) -> i32 {
    check!(
        "sg_udpv6_recvmsg",
        sendrecv::recvmsg_exit(&ctx, IPPROTO_UDP, true),
    );
    0
}

#[tracepoint]
pub fn sg_fork(ctx: TracePointContext) -> u32 {
    check!("sg_fork", process::fork(&ctx));
    0
}

#[tracepoint]
pub fn sg_exec(ctx: TracePointContext) -> u32 {
    check!("sg_exec", process::exec(&ctx));
    0
}

#[tracepoint]
pub fn sg_exit(ctx: TracePointContext) -> u32 {
    check!("sg_exit", process::exit(&ctx));
    0
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sg_sys_enter(ctx: RawTracePointContext) -> i32 {
    check!("sg_sys_enter", ondemand::sys_enter(&ctx));
    0
}

#[tracepoint]
pub fn sg_exit_connect(ctx: TracePointContext) -> u32 {
    check!("sg_exit_connect", ondemand::exit_connect(&ctx));
    0
}

#[uprobe]
pub fn sg_ssl_write(ctx: ProbeContext) -> u32 {
    check!("sg_ssl_write", tls::write(&ctx));
    0
}

#[uprobe]
pub fn sg_ssl_read(ctx: ProbeContext) -> u32 {
    check!("sg_ssl_read", tls::read_enter(&ctx, false));
    0
}

#[uprobe]
pub fn sg_ssl_read_ex(ctx: ProbeContext) -> u32 {
    check!("sg_ssl_read_ex", tls::read_enter(&ctx, true));
    0
}

#[uretprobe]
pub fn sg_ssl_read_ret(ctx: RetProbeContext) -> u32 {
    check!("sg_ssl_read_ret", tls::read_return(&ctx));
    0
}

// --- Floor programs for `cargo xtask bench` (see probes/floor.rs): one
// per-CPU counter increment on each hook above, nothing else. Tracepoints
// return 0 like the sensors do (1 would also build a perf sample).

use probes::floor;

#[tracepoint]
pub fn floor_set_state(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::SET_STATE);
    0
}

#[tracepoint]
pub fn floor_error_report(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::ERROR_REPORT);
    0
}

#[tracepoint]
pub fn floor_recv_reset(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::RECEIVE_RESET);
    0
}

#[tracepoint]
pub fn floor_retransmit(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::RETRANSMIT);
    0
}

#[tracepoint]
pub fn floor_udp_send(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::SEND_LENGTH);
    0
}

#[tracepoint]
pub fn floor_fork(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::FORK);
    0
}

#[tracepoint]
pub fn floor_exec(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::EXEC);
    0
}

#[tracepoint]
pub fn floor_exit(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::EXIT);
    0
}

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4(_ctx: SockAddrContext) -> i32 {
    floor::hit(floor::CONNECT4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn floor_connect6(_ctx: SockAddrContext) -> i32 {
    floor::hit(floor::CONNECT6);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn floor_sendmsg4(_ctx: SockAddrContext) -> i32 {
    floor::hit(floor::SENDMSG4);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn floor_sendmsg6(_ctx: SockAddrContext) -> i32 {
    floor::hit(floor::SENDMSG6);
    ALLOW
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn floor_sys_enter(_ctx: RawTracePointContext) -> i32 {
    floor::hit(floor::SYS_ENTER);
    0
}

#[tracepoint]
pub fn floor_exit_connect(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::EXIT_CONNECT);
    0
}

#[tracepoint]
pub fn floor_recv_length(_ctx: TracePointContext) -> u32 {
    floor::hit(floor::RECV_LENGTH);
    0
}

#[cgroup_sock(sock_release)]
pub fn floor_sock_release(_ctx: SockContext) -> i32 {
    floor::hit(floor::SOCK_RELEASE);
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
