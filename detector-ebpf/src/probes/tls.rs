//! Plaintext of TLS through a shared libssl (curl, CPython, …): uprobes on
//! `SSL_write`/`SSL_write_ex` and `SSL_read`/`SSL_read_ex`, attached only
//! while something is suspect, and acting only for suspect processes.
//!
//! The request's fingerprint is taken from the plaintext (ciphertext never
//! repeats), and the reply's first bytes (an HTTP status line) are written
//! over the ciphertext head of the connection's current exchange. The
//! connection is the one the thread last received on: `SSL_read` reads its
//! socket before it returns.
use aya_ebpf::programs::{ProbeContext, RetProbeContext};
use detector_common::{FINGERPRINT_BYTES, HEAD_BYTES, table};

use crate::{
    maps::{CONNS, THREAD_SOCK, TLS_FP, TLS_READS},
    tables::{put, take},
    util::{current, is_suspect},
};

/// [`detector_common::Conn::head_set`] when the head is plaintext.
pub const HEAD_PLAINTEXT: u32 = 2;

/// `SSL_write(ssl, buf, num)` and `SSL_write_ex(ssl, buf, num, written)`.
pub fn write(ctx: &ProbeContext) -> Result<(), i64> {
    let (tgid, tid) = current();
    if !is_suspect(tgid) {
        return Ok(());
    }
    let buf: u64 = ctx.arg(1).ok_or(-1i64)?;
    let len: u64 = ctx.arg(2).ok_or(-1i64)?;
    let mut bytes = [0u8; FINGERPRINT_BYTES];
    let n = if len as usize > FINGERPRINT_BYTES {
        FINGERPRINT_BYTES
    } else {
        len as usize
    };
    if n > 0 {
        // SAFETY: a probe read of at most 64 bytes of user memory into our
        // buffer; a failure leaves zeros.
        unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                bytes.as_mut_ptr().cast(),
                n as u32,
                buf as *const core::ffi::c_void,
            )
        };
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ len;
    for (i, b) in bytes.iter().enumerate() {
        if i >= n {
            break;
        }
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    put(&TLS_FP, table::TLS_FP, &tid, &(h | 1));
    Ok(())
}

/// Where a thread's `SSL_read` puts what it decrypted.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsRead {
    pub buf: u64,
    /// `SSL_read_ex`'s `size_t *readbytes`; 0 for `SSL_read`.
    pub readbytes: u64,
}

/// `SSL_read(ssl, buf, num)`; `ex` for `SSL_read_ex(ssl, buf, num, readbytes)`.
pub fn read_enter(ctx: &ProbeContext, ex: bool) -> Result<(), i64> {
    let (tgid, tid) = current();
    if !is_suspect(tgid) {
        return Ok(());
    }
    let buf: u64 = ctx.arg(1).ok_or(-1i64)?;
    let readbytes: u64 = if ex { ctx.arg(3).ok_or(-1i64)? } else { 0 };
    put(
        &TLS_READS,
        table::TLS_READS,
        &tid,
        &TlsRead { buf, readbytes },
    );
    Ok(())
}

/// The return of either read: the plaintext's first bytes become the head
/// of the exchange on the thread's connection.
pub fn read_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let (_, tid) = current();
    let Some(read) = take(&TLS_READS, table::TLS_READS, &tid) else {
        return Ok(());
    };
    let ret: i64 = ctx.ret();
    let got = if read.readbytes != 0 {
        if ret != 1 {
            return Ok(());
        }
        // SAFETY: a probe read of the caller's size_t. Paged-out user
        // memory is an ordinary failure, not an anomaly: skip this read.
        match unsafe { aya_ebpf::helpers::bpf_probe_read_user(read.readbytes as *const u64) } {
            Ok(n) => n,
            Err(_) => return Ok(()),
        }
    } else {
        ret as u64
    };
    if got == 0 || got > i32::MAX as u64 {
        return Ok(());
    }
    // SAFETY: pointer from a successful lookup, copied at once.
    let Some(sk) = THREAD_SOCK.get_ptr(tid).map(|p| unsafe { *p }) else {
        return Ok(());
    };
    let Some(conn) = CONNS.get_ptr_mut(sk) else {
        return Ok(());
    };
    // SAFETY: pointer into the map value; a race with the connection's own
    // tracepoints could only misplace one head.
    let conn = unsafe { &mut *conn };
    if conn.head_set == HEAD_PLAINTEXT {
        return Ok(());
    }
    let mut head = [0u8; HEAD_BYTES];
    // SAFETY: a probe read of HEAD_BYTES of user memory the library just
    // filled (fewer bytes may be valid; the rest is whatever was there,
    // which only the parser sees).
    let ok = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            head.as_mut_ptr().cast(),
            HEAD_BYTES as u32,
            read.buf as *const core::ffi::c_void,
        )
    } == 0;
    if ok {
        conn.reply_head = head;
        conn.head_set = HEAD_PLAINTEXT;
    }
    Ok(())
}
