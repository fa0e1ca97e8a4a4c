//! Input files as a stream of frames: JSON lines, or length-prefixed binary records, read
//! one at a time with the size limit applied, so a file of any size streams through a
//! buffer of one record.

use std::io::{BufRead, ErrorKind};

use crate::codec::{Format, MAX_RECORD_BYTES};

/// Where a frame of an input file starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// 1-based line (JSON lines).
    Line(u64),
    /// Byte offset of its length prefix (binary).
    Offset(u64),
}

impl Place {
    /// The position as dead letters name it: `name:line` or `name@offset`.
    pub fn describe(self, name: &str) -> String {
        match self {
            Place::Line(l) => format!("{name}:{l}"),
            Place::Offset(o) => format!("{name}@{o}"),
        }
    }
}

/// One frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A frame within the size limit (a JSON line without its `\n` or `\r\n`; a binary
    /// frame's payload, cut short if the file ends inside it).
    Whole(Place, &'a [u8]),
    /// A frame larger than the limit: its length and its first `limit` bytes. The rest was
    /// skipped without being held in memory.
    TooLarge {
        /// Where it starts.
        place: Place,
        /// Its full length in bytes.
        len: u64,
        /// Its first bytes.
        head: &'a [u8],
    },
}

/// Reads frames one at a time from a buffered reader.
pub struct FrameReader<R> {
    input: R,
    format: Format,
    limit: usize,
    buf: Vec<u8>,
    /// Bytes consumed so far (the next frame's offset).
    offset: u64,
    line: u64,
}

impl<R: BufRead> FrameReader<R> {
    /// Frames of `input` in `format`, each at most [`MAX_RECORD_BYTES`].
    pub fn new(input: R, format: Format) -> FrameReader<R> {
        FrameReader::with_limit(input, format, MAX_RECORD_BYTES)
    }

    /// Frames of `input` with another size limit (for tests).
    pub fn with_limit(input: R, format: Format, limit: usize) -> FrameReader<R> {
        FrameReader {
            input,
            format,
            limit,
            buf: Vec::with_capacity(4096),
            offset: 0,
            line: 0,
        }
    }

    /// Takes the buffer holding the last whole frame (its bytes exactly), leaving `spare`
    /// in its place: a caller that keeps frames gets them without a copy.
    pub fn take_frame(&mut self, mut spare: Vec<u8>) -> Vec<u8> {
        spare.clear();
        std::mem::replace(&mut self.buf, spare)
    }

    /// Bytes read so far.
    pub fn consumed(&self) -> u64 {
        self.offset
    }

    /// The next frame, `None` at the end of the input. Blank JSON lines are skipped.
    pub fn next_frame(&mut self) -> std::io::Result<Option<Frame<'_>>> {
        match self.format {
            Format::Json => self.next_line(),
            Format::Binary => self.next_binary(),
        }
    }

    fn next_line(&mut self) -> std::io::Result<Option<Frame<'_>>> {
        loop {
            self.buf.clear();
            self.line += 1;
            // Read up to the newline, holding at most `limit` bytes (plus the `\r` that
            // may end a line) and counting the rest.
            let mut len = 0u64;
            let mut ended = false;
            loop {
                let chunk = match self.input.fill_buf() {
                    Ok(c) => c,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if chunk.is_empty() {
                    break;
                }
                let (take, found) = match memchr::memchr(b'\n', chunk) {
                    Some(i) => (i, true),
                    None => (chunk.len(), false),
                };
                let room = (self.limit + 1).saturating_sub(self.buf.len());
                self.buf.extend_from_slice(&chunk[..take.min(room)]);
                len += take as u64;
                let used = take + usize::from(found);
                self.input.consume(used);
                self.offset += used as u64;
                if found {
                    ended = true;
                    break;
                }
            }
            if !ended && len == 0 {
                return Ok(None);
            }
            if self.buf.last() == Some(&b'\r') && len as usize == self.buf.len() {
                self.buf.pop();
                len -= 1;
            }
            if len as usize > self.limit {
                self.buf.truncate(self.limit);
                return Ok(Some(Frame::TooLarge {
                    place: Place::Line(self.line),
                    len,
                    head: &self.buf,
                }));
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                if !ended {
                    return Ok(None);
                }
                continue;
            }
            return Ok(Some(Frame::Whole(Place::Line(self.line), &self.buf)));
        }
    }

    /// Reads up to `n` bytes into `buf` (appending), fewer only at the end of the input.
    fn read_up_to(&mut self, n: u64, keep: usize) -> std::io::Result<u64> {
        let mut got = 0u64;
        while got < n {
            let chunk = match self.input.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                break;
            }
            let take = (n - got).min(chunk.len() as u64) as usize;
            let room = keep.saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&chunk[..take.min(room)]);
            self.input.consume(take);
            got += take as u64;
        }
        self.offset += got;
        Ok(got)
    }

    fn next_binary(&mut self) -> std::io::Result<Option<Frame<'_>>> {
        let start = self.offset;
        self.buf.clear();
        let got = self.read_up_to(4, 4)?;
        if got == 0 {
            return Ok(None);
        }
        if got < 4 {
            // A length prefix cut off: the frame is what is left.
            return Ok(Some(Frame::Whole(Place::Offset(start), &self.buf)));
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        self.buf.clear();
        let got = self.read_up_to(u64::from(len), self.limit)?;
        if got > self.limit as u64 {
            return Ok(Some(Frame::TooLarge {
                place: Place::Offset(start),
                len: got,
                head: &self.buf,
            }));
        }
        Ok(Some(Frame::Whole(Place::Offset(start), &self.buf)))
    }
}

/// Every frame of an input held in memory, with its place; frames over the size limit
/// come back cut to it (the caller's decoder then refuses them).
pub fn frames(buf: &[u8], format: Format) -> Vec<(Place, Vec<u8>)> {
    let mut r = FrameReader::new(buf, format);
    let mut out = Vec::new();
    while let Ok(Some(f)) = r.next_frame() {
        match f {
            Frame::Whole(p, b) => out.push((p, b.to_vec())),
            Frame::TooLarge { place, head, .. } => out.push((place, head.to_vec())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8], format: Format, limit: usize) -> Vec<(Place, String, Option<u64>)> {
        let mut r = FrameReader::with_limit(input, format, limit);
        let mut out = Vec::new();
        while let Some(f) = r.next_frame().unwrap() {
            out.push(match f {
                Frame::Whole(p, b) => (p, String::from_utf8_lossy(b).into_owned(), None),
                Frame::TooLarge { place, len, head } => {
                    (place, String::from_utf8_lossy(head).into_owned(), Some(len))
                }
            });
        }
        assert_eq!(r.consumed(), input.len() as u64, "every byte is read");
        out
    }

    #[test]
    fn json_lines_skip_blanks_strip_cr_and_cut_long_lines_at_the_limit() {
        let input = b"ab\r\n\n  \ncdefgh\nij\r\nklmnopqrstu\nlast";
        let got = all(input, Format::Json, 6);
        let want = vec![
            (Place::Line(1), "ab".to_string(), None),
            (Place::Line(4), "cdefgh".to_string(), None),
            (Place::Line(5), "ij".to_string(), None),
            (Place::Line(6), "klmnop".to_string(), Some(11)),
            (Place::Line(7), "last".to_string(), None),
        ];
        assert_eq!(got, want);
        assert!(all(b"", Format::Json, 6).is_empty());
        assert!(all(b"\n\n  ", Format::Json, 6).is_empty());
    }

    #[test]
    fn a_long_line_is_never_held_whole() {
        // 10 MB through a tiny buffered reader: the reader keeps the limit, not the line.
        let mut input = vec![b'x'; 10_000_000];
        input.extend_from_slice(b"\n{}\n");
        let mut r = FrameReader::with_limit(
            std::io::BufReader::with_capacity(1024, input.as_slice()),
            Format::Json,
            64,
        );
        match r.next_frame().unwrap() {
            Some(Frame::TooLarge { len, head, .. }) => {
                assert_eq!((len, head.len()), (10_000_000, 64));
            }
            other => panic!("{other:?}"),
        }
        assert!(r.buf.capacity() < 16 * 1024, "{}", r.buf.capacity());
        assert_eq!(
            r.next_frame().unwrap(),
            Some(Frame::Whole(Place::Line(2), b"{}"))
        );
    }

    #[test]
    fn binary_frames_carry_their_offset_and_a_cut_off_frame_is_a_frame() {
        let mut input = Vec::new();
        for p in [&b"abc"[..], b"", b"0123456789"] {
            input.extend_from_slice(&(p.len() as u32).to_le_bytes());
            input.extend_from_slice(p);
        }
        input.extend_from_slice(&9u32.to_le_bytes());
        input.extend_from_slice(b"xy");
        input.extend_from_slice(&[1, 0]);
        let got = all(&input, Format::Binary, 8);
        let want = vec![
            (Place::Offset(0), "abc".to_string(), None),
            (Place::Offset(7), String::new(), None),
            (Place::Offset(11), "01234567".to_string(), Some(10)),
            (Place::Offset(25), "xy\u{1}\0".to_string(), None),
        ];
        assert_eq!(got, want);
        let cut = all(&[5, 0], Format::Binary, 8);
        assert_eq!(cut, vec![(Place::Offset(0), "\u{5}\0".to_string(), None)]);
    }
}
