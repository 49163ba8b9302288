//! The destination a sock_addr hook's caller asked for, shared by the
//! sensors and the enforcement object.
use core::ptr::read_volatile;

use aya_ebpf::bindings::bpf_sock_addr;
use detector_common::AF_INET;

/// The destination address (IPv4 in the first 4 bytes) and port (host
/// order) of a connect or sendmsg.
#[inline(always)]
pub fn user_dest(sa: &bpf_sock_addr, family: u16) -> ([u8; 16], u16) {
    // The verifier only accepts context loads at a constant offset from the
    // unmodified context pointer: one volatile read per field, no loops.
    let mut words = [0u32; 4];
    // SAFETY: plain loads of fields of the kernel-provided context.
    unsafe {
        if family == AF_INET {
            words[0] = read_volatile(&sa.user_ip4);
        } else {
            words[0] = read_volatile(&sa.user_ip6[0]);
            words[1] = read_volatile(&sa.user_ip6[1]);
            words[2] = read_volatile(&sa.user_ip6[2]);
            words[3] = read_volatile(&sa.user_ip6[3]);
        }
    }
    let mut daddr = [0u8; 16];
    daddr[0..4].copy_from_slice(&words[0].to_ne_bytes());
    daddr[4..8].copy_from_slice(&words[1].to_ne_bytes());
    daddr[8..12].copy_from_slice(&words[2].to_ne_bytes());
    daddr[12..16].copy_from_slice(&words[3].to_ne_bytes());
    // SAFETY: as above.
    let dport = u16::from_be(unsafe { read_volatile(&sa.user_port) } as u16);
    (daddr, dport)
}
