//! The checks that catch the kernel delivering bytes twice.
//!
//! # A kernel bug the verdict works around
//!
//! `tcp_read_skb()` hands whole buffers to the verdict and ignores the reader's offset in
//! them. When the sender retransmits a segment with other boundaries (seen under CPU load:
//! drops with reason TCP_OLD_SEQUENCE/TCP_OLD_DATA), TCP queues a buffer whose head overlaps
//! bytes already delivered. The verdict's overlap guard (`ntlm-ebpf`) compares the buffer's
//! sequence number with the socket's next expected one and cuts the overlap off before
//! forwarding. Where it cannot (no kernel BTF, or a cut failed), every check still compares
//! redirected plus copied with what TCP received in sequence and resets the connection when
//! they disagree, before passed duplicates are written, and within one check for redirected
//! ones. `NTLM_SPLICE_SOCKMAP_PARSER=1` attaches the stream parser (which reads with
//! `tcp_read_sock` and skips overlaps itself) for comparison measurements only.

use std::{io, sync::atomic::Ordering};

use super::{
    session::Conn,
    sock,
};
use crate::lifecycle::{Dir, Fault, Side};

impl Conn<'_> {
    /// Data bytes that arrived on `src` since set-up (the FIN not counted).
    fn arrived(&self, src: Side) -> Result<u64, Fault> {
        let info = sock::tcp_info(self.fd(src)).map_err(Fault::on(src))?;
        let fin = u64::from(sock::fin_received(info.state));
        Ok(info.bytes_received.saturating_sub(fin).saturating_sub(self.base_consumed[src as usize]))
    }

    /// Fails if the kernel handed the verdict more bytes than TCP received in sequence, or if
    /// the verdict's overlap guard met a buffer it could not cut.
    ///
    /// `tcp_read_skb()` (the verdict path) passes whole socket buffers and ignores where the
    /// reader stands in them; after a retransmission TCP queues a buffer whose head overlaps
    /// bytes already delivered (seen here under load: a duplicated 65,483-byte segment). The
    /// verdict cuts that overlap off by sequence number (`ntlm-ebpf`, overlap guard); this
    /// check is what stands when the guard is off (no kernel BTF) or failed: redirected plus
    /// passed would then exceed what arrived. `extra`: bytes userspace took out of the source
    /// besides the verdict's. Read in this order (stats, then TCP_INFO) the check has no
    /// false alarms.
    pub(super) fn check_no_duplicate(&self, dir: Dir, extra: u64) -> Result<(), Fault> {
        self.check_no_duplicate_of(dir, extra, None)
    }

    /// [`Self::check_no_duplicate`]; `final_arrived`: the source's final count of arrived
    /// bytes (after its EOF, when no byte can arrive any more), read already, so the order of
    /// the reads no longer matters.
    pub(super) fn check_no_duplicate_of(&self, dir: Dir, extra: u64, final_arrived: Option<u64>) -> Result<(), Fault> {
        let st = self.stats(dir.src())?;
        if st.guard_failed != 0 {
            self.eng.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Err(Fault::Internal(io::Error::other(format!(
                "the overlap guard could not cut a retransmitted segment from the {:?} socket ({}) and dropped \
                 it; the stream is no longer intact, resetting the connection",
                dir.src(),
                match st.cut_err as i64 {
                    0 => "a kernel read failed".to_owned(),
                    -12 => "error -12, ENOMEM: the kernel's atomic allocation failed".to_owned(),
                    -7 => format!("error -7, E2BIG: an overlap of {} bytes, over the verdict's limit", st.overlap_max),
                    e => format!("error {e}"),
                }
            ))));
        }
        let delivered = st.bytes + extra;
        let arrived = match final_arrived {
            Some(a) => a,
            None => self.arrived(dir.src())?,
        };
        if delivered > arrived {
            self.eng.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Err(Fault::Internal(io::Error::other(format!(
                "the kernel delivered {} bytes twice from the {:?} socket (tcp_read_skb ignores the overlap of a \
                 retransmitted segment{}); resetting the connection rather than passing them on",
                delivered - arrived,
                dir.src(),
                if self.eng.kernel.guard_off.is_some() {
                    ", and the overlap guard is off"
                } else {
                    ""
                }
            ))));
        }
        Ok(())
    }
}
