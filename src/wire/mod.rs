//! The wire format, shared by both binaries and the store: how lines are framed, what a
//! reading line must hold, and the reply and record lines written in answer. The
//! contract itself is `docs/protocol.md`.

mod fast;
pub mod framing;
pub mod json;
pub mod line;
pub mod reading;
pub mod record;
pub mod reply;

/// Appends `bytes` to `out`. Replies and records are built from short pieces (a seq, a
/// kind, a status). musl's `memcpy` is `rep movs`, which costs tens of cycles even for
/// a few bytes, and the static musl build is what production runs: there, pieces up to
/// 32 bytes are copied by a loop the compiler keeps inline (measured: memcpy was 30% of
/// the musl server's CPU, called ~7 times per reading with 2 to 16 bytes).
#[inline]
pub(crate) fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    #[cfg(target_env = "musl")]
    if bytes.len() <= 32 {
        out.reserve(bytes.len());
        for &b in bytes {
            out.push(b);
        }
        return;
    }
    out.extend_from_slice(bytes);
}
