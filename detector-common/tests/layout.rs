//! Pins the size, alignment and field offsets of every type shared with the
//! kernel programs. The eBPF side and the user side are compiled separately;
//! if one changes a layout the other still assumes, this fails instead of
//! the daemon decoding garbage.
use std::mem::{align_of, offset_of, size_of};

use detector_common::{Conn, Event, Fingerprint, MsgDest, Offsets, TupleKey, UdpDest};

#[test]
fn event_layout() {
    assert_eq!(size_of::<Event>(), 136);
    assert_eq!(align_of::<Event>(), 8, "ring buffer items must align ≤ 8");
    assert_eq!(offset_of!(Event, ts_ns), 0);
    assert_eq!(offset_of!(Event, start_ns), 8);
    assert_eq!(offset_of!(Event, netns), 16);
    assert_eq!(offset_of!(Event, cgroup), 24);
    assert_eq!(offset_of!(Event, hash), 32);
    assert_eq!(offset_of!(Event, sock), 40);
    assert_eq!(offset_of!(Event, tgid), 48);
    assert_eq!(offset_of!(Event, aux), 52);
    assert_eq!(offset_of!(Event, aux2), 56);
    assert_eq!(offset_of!(Event, errno), 60);
    assert_eq!(offset_of!(Event, dport), 64);
    assert_eq!(offset_of!(Event, family), 66);
    assert_eq!(offset_of!(Event, kind), 68);
    assert_eq!(offset_of!(Event, outcome), 69);
    assert_eq!(offset_of!(Event, flags), 70);
    assert_eq!(offset_of!(Event, _pad), 71);
    assert_eq!(offset_of!(Event, daddr), 72);
    assert_eq!(offset_of!(Event, comm), 88);
    assert_eq!(offset_of!(Event, head), 104);
}

#[test]
fn map_key_and_value_layouts_have_no_implicit_padding() {
    assert_eq!(size_of::<TupleKey>(), 24);
    assert_eq!(offset_of!(TupleKey, family), 0);
    assert_eq!(offset_of!(TupleKey, sport), 2);
    assert_eq!(offset_of!(TupleKey, dport), 4);
    assert_eq!(offset_of!(TupleKey, _pad), 6);
    assert_eq!(offset_of!(TupleKey, daddr), 8);

    assert_eq!(size_of::<UdpDest>(), 32);
    assert_eq!(offset_of!(UdpDest, netns), 0);
    assert_eq!(offset_of!(UdpDest, dport), 8);
    assert_eq!(offset_of!(UdpDest, family), 10);
    assert_eq!(offset_of!(UdpDest, _pad), 12);
    assert_eq!(offset_of!(UdpDest, daddr), 16);

    assert_eq!(size_of::<MsgDest>(), 48);
    assert_eq!(offset_of!(MsgDest, sk), 0);
    assert_eq!(offset_of!(MsgDest, tid), 8);
    assert_eq!(offset_of!(MsgDest, _pad), 12);
    assert_eq!(offset_of!(MsgDest, dest), 16);

    assert_eq!(size_of::<Conn>(), 136 + 32 + 32);
    assert_eq!(offset_of!(Conn, tmpl), 0);
    assert_eq!(offset_of!(Conn, req_hash), 136);
    assert_eq!(offset_of!(Conn, req_sent), 144);
    assert_eq!(offset_of!(Conn, req_recv), 148);
    assert_eq!(offset_of!(Conn, total_sent), 152);
    assert_eq!(offset_of!(Conn, total_recv), 156);
    assert_eq!(offset_of!(Conn, phase), 160);
    assert_eq!(offset_of!(Conn, head_set), 164);
    assert_eq!(offset_of!(Conn, reply_head), 168);

    assert_eq!(size_of::<Fingerprint>(), 24 + 44 + 4);
    assert_eq!(offset_of!(Fingerprint, whole), 0);
    assert_eq!(offset_of!(Fingerprint, skip2), 8);
    assert_eq!(offset_of!(Fingerprint, tid), 16);
    assert_eq!(offset_of!(Fingerprint, _pad), 20);
    assert_eq!(offset_of!(Fingerprint, head), 24);
}

#[test]
fn offsets_is_a_flat_array_of_u32() {
    // The loader writes it over .rodata byte for byte: 33 u32 fields.
    assert_eq!(size_of::<Offsets>(), 33 * 4);
    assert_eq!(align_of::<Offsets>(), 4);
    assert_eq!(offset_of!(Offsets, ss_skaddr), 0);
    assert_eq!(offset_of!(Offsets, er_error), 9 * 4);
    assert_eq!(offset_of!(Offsets, sl_sk), 16 * 4);
    assert_eq!(offset_of!(Offsets, rl_sk), 20 * 4);
    assert_eq!(offset_of!(Offsets, rl_flags), 24 * 4);
    assert_eq!(offset_of!(Offsets, rr_skaddr), 25 * 4);
    assert_eq!(offset_of!(Offsets, rt_err), 28 * 4);
    assert_eq!(offset_of!(Offsets, xc_ret), 32 * 4);
}

/// Anomaly kinds are the first STATS slots, then two per counted table:
/// no slot is shared, none is past the array.
#[test]
fn stats_slots_do_not_overlap() {
    use detector_common::{anomaly, stat, table};
    assert_eq!(stat::RING_DROPS, anomaly::RING_FULL);
    assert_eq!(stat::MAP_FULL, anomaly::MAP_INSERT);
    assert_eq!(anomaly::NAMES.len() as u32, anomaly::COUNT);
    assert_eq!(table::NAMES.len() as u32, table::COUNT);
    let mut slots: Vec<u32> = (0..anomaly::COUNT).collect();
    for t in 0..table::COUNT {
        slots.push(stat::inserts(t));
        slots.push(stat::deletes(t));
    }
    slots.push(stat::STACK_WALK_FAILED);
    slots.push(stat::STACK_COPY_LOST);
    let n = slots.len();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), n);
    assert_eq!(slots.last().copied(), Some(stat::COUNT - 1));
}

#[test]
fn stack_layouts_have_no_implicit_padding() {
    use detector_common::stack::{COPY_BYTES, Copy, CountKey, Note};
    assert_eq!(size_of::<Note>(), 8);
    assert_eq!(offset_of!(Note, stack), 4);
    assert_eq!(size_of::<CountKey>(), 40);
    assert_eq!(offset_of!(CountKey, netns), 0);
    assert_eq!(offset_of!(CountKey, tgid), 8);
    assert_eq!(offset_of!(CountKey, stack), 12);
    assert_eq!(offset_of!(CountKey, dport), 16);
    assert_eq!(offset_of!(CountKey, family), 18);
    assert_eq!(offset_of!(CountKey, proto), 20);
    assert_eq!(offset_of!(CountKey, _pad), 22);
    assert_eq!(offset_of!(CountKey, daddr), 24);
    assert_eq!(size_of::<Copy>(), 40 + COPY_BYTES);
    assert_eq!(align_of::<Copy>(), 8, "ring buffer items must align ≤ 8");
    assert_eq!(offset_of!(Copy, tgid), 24);
    assert_eq!(offset_of!(Copy, tid), 28);
    assert_eq!(offset_of!(Copy, stack), 32);
    assert_eq!(offset_of!(Copy, len), 36);
    assert_eq!(offset_of!(Copy, bytes), 40);
}
