//! The copy writers' output cursor: a fixed-size window of a `Vec`'s spare capacity that
//! one copy is written into without a capacity check or a `memcpy` call per piece.
//!
//! A `Vec` write checks and may grow the capacity and calls `memcpy` for every slice;
//! over the 40 to 80 pieces of a copy that was most of the encoders' cost. The cursor
//! reserves once per copy, keeps its position in a register, and moves short values in
//! at most two fixed-size moves. A write that does not fit fails, and the caller writes
//! the copy again through its `Vec` path.

use std::mem::MaybeUninit;

/// Writes into the spare capacity of `out`, at most `N` bytes, with `write`; on success
/// the written bytes become part of `out`. On failure (`write` returned `None`: the copy
/// did not fit, or a value needs the slow path) `out` is left as it was and `false` is
/// returned.
#[inline(always)]
pub(super) fn write_with<const N: usize>(
    out: &mut Vec<u8>,
    write: impl FnOnce(&mut Cursor<'_, N>) -> Option<()>,
) -> bool {
    let start = out.len();
    out.reserve(N);
    let n = match <&mut [MaybeUninit<u8>; N]>::try_from(&mut out.spare_capacity_mut()[..N]) {
        Ok(buf) => {
            let mut w = Cursor { buf, pos: 0 };
            write(&mut w).map(|()| w.pos)
        }
        Err(_) => None,
    };
    match n {
        // SAFETY: the cursor initialised the first `n` bytes of the spare capacity (see
        // `Cursor`), and `n <= N` fits in it.
        Some(n) => {
            unsafe { out.set_len(start + n) };
            true
        }
        None => false,
    }
}

/// A window of `N` bytes of spare capacity and the position written up to.
///
/// The window is not zeroed first (that cost a `memset` per copy): every write
/// initialises the bytes it moves `pos` over, so `buf[..pos]` is always initialised.
pub(super) struct Cursor<'b, const N: usize> {
    buf: &'b mut [MaybeUninit<u8>; N],
    pos: usize,
}

/// Initialises `dst` with `src` (both the same length at every call): `copy_from_slice`
/// for uninitialised bytes, which is not stable at the crate's minimum Rust. A fixed-size
/// move when the length is a constant.
#[inline(always)]
fn init(dst: &mut [MaybeUninit<u8>], src: &[u8]) {
    let n = dst.len().min(src.len());
    // SAFETY: both ranges hold `n` bytes, and a `&mut` cannot overlap a `&`.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<u8>(), n) }
}

impl<const N: usize> Cursor<'_, N> {
    /// Where the next byte goes.
    #[inline(always)]
    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    /// Writes a constant-size piece: one fixed-size move.
    #[inline(always)]
    pub(super) fn put<const M: usize>(&mut self, b: [u8; M]) -> Option<()> {
        init(self.buf.get_mut(self.pos..self.pos + M)?, &b);
        self.pos += M;
        Some(())
    }

    /// Writes a tag byte and a constant-size piece after it: a byte and a fixed-size
    /// move under one bounds check. (An array of the tag and the piece's bytes is built
    /// byte by byte, several instructions a byte.)
    #[inline(always)]
    pub(super) fn tagged<const M: usize>(&mut self, tag: u8, b: [u8; M]) -> Option<()> {
        let dst = self.buf.get_mut(self.pos..self.pos + 1 + M)?;
        dst[0].write(tag);
        init(&mut dst[1..], &b);
        self.pos += 1 + M;
        Some(())
    }

    /// Overwrites one byte already written (at `at < pos`).
    #[inline(always)]
    pub(super) fn set(&mut self, at: usize, b: u8) {
        if at < self.pos {
            self.buf[at].write(b);
        }
    }

    /// A short slice is copied in at most two overlapping fixed-size moves, without a
    /// call to `memcpy` (most values are 2 to 64 bytes; an envelope's tags about 90).
    /// Every branch writes all `n` bytes. The sizes are tested most common first: most
    /// identifiers are 8 to 16 bytes, and reach their move after two comparisons.
    #[inline(always)]
    pub(super) fn bytes(&mut self, b: &[u8]) -> Option<()> {
        let n = b.len();
        let dst = self.buf.get_mut(self.pos..self.pos + n)?;
        if n <= 16 {
            if n >= 8 {
                init(&mut dst[..8], &b[..8]);
                init(&mut dst[n - 8..], &b[n - 8..]);
            } else if n >= 4 {
                init(&mut dst[..4], &b[..4]);
                init(&mut dst[n - 4..], &b[n - 4..]);
            } else if n >= 1 {
                dst[0].write(b[0]);
                dst[n / 2].write(b[n / 2]);
                dst[n - 1].write(b[n - 1]);
            }
        } else if n <= 32 {
            init(&mut dst[..16], &b[..16]);
            init(&mut dst[n - 16..], &b[n - 16..]);
        } else if n <= 64 {
            init(&mut dst[..32], &b[..32]);
            init(&mut dst[n - 32..], &b[n - 32..]);
        } else if n <= 128 {
            init(&mut dst[..64], &b[..64]);
            init(&mut dst[n - 64..], &b[n - 64..]);
        } else {
            init(dst, b);
        }
        self.pos += n;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_length_is_copied_whole_and_a_piece_too_large_leaves_the_vec_as_it_was() {
        let src: Vec<u8> = (0..200u8).collect();
        for n in 0..=200 {
            let mut out = b"head".to_vec();
            assert!(write_with::<256>(&mut out, |w| {
                w.put(*b"<")?;
                w.bytes(&src[..n])?;
                w.put(*b">")
            }));
            let mut want = b"head<".to_vec();
            want.extend_from_slice(&src[..n]);
            want.push(b'>');
            assert_eq!(out, want, "{n}");
        }
        let mut out = b"head".to_vec();
        assert!(!write_with::<64>(&mut out, |w| {
            w.bytes(&src[..60])?;
            w.bytes(&src[..10])
        }));
        assert_eq!(out, b"head");
        assert!(!write_with::<64>(&mut out, |w| {
            w.put(*b"x")?;
            None
        }));
        assert_eq!(out, b"head");
    }

    #[test]
    fn set_overwrites_only_what_was_written() {
        let mut out = Vec::new();
        assert!(write_with::<16>(&mut out, |w| {
            w.put(*b",a")?;
            w.set(0, b'{');
            w.set(5, b'!');
            w.put(*b"}")
        }));
        assert_eq!(out, b"{a}");
    }
}
