//! Output files written in large appends, past the page cache where the file system
//! allows it.
//!
//! Replay writes several times its input (2.6 KB of copies per 470-byte record): 26 GB
//! for 10^7 records. Through the page cache, the kernel copies every byte and then has to
//! find room for the next ones by writing back and evicting the last: on this project's
//! machines that cost more CPU than processing the records (1.4 ns a byte against 0.2
//! with direct I/O, `dd` of 8 GB). So whole 1 MiB chunks go out with `O_DIRECT` from an
//! aligned buffer, and only the unaligned tail at the end through the page cache. Where
//! the file system refuses `O_DIRECT` (tmpfs), everything goes through the page cache.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes gathered before a write: a multiple of the block size direct I/O needs.
const CHUNK: usize = 1 << 20;

/// Direct I/O needs the buffer's address, the length and the file offset aligned to the
/// device's block size; 4 KiB covers every common one.
const ALIGN: usize = 4096;

/// A file of lines. Callers encode straight into its buffer with [`Lines::line`] (no
/// copy into a writer's own buffer). The buffer's data starts `pad` bytes in, where its
/// address is aligned, so whole chunks go to the kernel from where they were encoded.
pub struct Lines {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Filler before the data; only its length matters.
    pad: usize,
    /// Whether the file was opened for direct I/O.
    direct: bool,
}

/// Bytes to skip from `p` to the next aligned address.
fn pad_for(p: *const u8) -> usize {
    (ALIGN - (p as usize) % ALIGN) % ALIGN
}

impl Lines {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: &Path) -> std::io::Result<Lines> {
        let named =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let (file, direct) = match open_direct(path) {
            Some(f) => (f, true),
            None => (File::create(path).map_err(named)?, false),
        };
        let mut buf = Vec::with_capacity(2 * CHUNK + ALIGN);
        let pad = pad_for(buf.as_ptr());
        buf.resize(pad, 0);
        Ok(Lines {
            path: path.to_path_buf(),
            file,
            buf,
            pad,
            direct,
        })
    }

    /// Appends one line: `encode` writes it (without its newline) at the end of the
    /// buffer; whole chunks are written out once there is one.
    pub fn line(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> std::io::Result<()> {
        encode(&mut self.buf);
        self.buf.push(b'\n');
        self.written()
    }

    /// Writes out whole chunks once there is one.
    fn written(&mut self) -> std::io::Result<()> {
        if self.buf.len() - self.pad >= CHUNK {
            self.write_chunks()?;
        }
        Ok(())
    }

    fn write_chunks(&mut self) -> std::io::Result<()> {
        if !self.direct {
            self.file.write_all(&self.buf[self.pad..])?;
            self.buf.truncate(self.pad);
            return Ok(());
        }
        // A line longer than the spare capacity moved the buffer: align the data again.
        if pad_for(self.buf.as_ptr()) != self.pad {
            let data = self.buf.split_off(self.pad);
            self.buf.clear();
            // Room for everything first, so nothing below moves the buffer again.
            self.buf.reserve(data.len() + ALIGN);
            self.pad = pad_for(self.buf.as_ptr());
            self.buf.resize(self.pad, 0);
            self.buf.extend_from_slice(&data);
        }
        let whole = (self.buf.len() - self.pad) / CHUNK * CHUNK;
        self.file.write_all(&self.buf[self.pad..self.pad + whole])?;
        self.buf.drain(self.pad..self.pad + whole);
        Ok(())
    }

    /// Writes everything, the unaligned tail through the page cache, and syncs nothing
    /// (the caller decides about durability).
    pub fn finish(&mut self) -> std::io::Result<()> {
        self.write_chunks()?;
        let tail = &self.buf[self.pad..];
        if self.direct && !tail.is_empty() {
            // Direct writes need aligned lengths: the tail goes through a second handle.
            OpenOptions::new()
                .append(true)
                .open(&self.path)?
                .write_all(tail)?;
        } else {
            self.file.write_all(tail)?;
        }
        self.direct = false;
        self.buf.truncate(self.pad);
        Ok(())
    }
}

impl Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        self.written()?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        // Nothing is pushed early: a direct write must wait for a whole chunk.
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_: &Path) -> Option<File> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte arrives, in order, whether chunks went out directly or not, and a tail
    /// of any length follows them.
    #[test]
    fn every_line_arrives_in_order_across_chunks_and_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        for lines in [0usize, 1, 3_000, 40_000] {
            let path = dir.path().join(format!("{lines}.jsonl"));
            let mut w = Lines::create(&path).unwrap();
            let mut want = Vec::new();
            for i in 0..lines {
                let line = format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 97));
                want.extend_from_slice(line.as_bytes());
                w.line(|b| b.extend_from_slice(line.trim_end().as_bytes()))
                    .unwrap();
            }
            w.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), want, "{lines} lines");
        }
    }

    /// A line longer than the buffer's spare room moves the buffer; chunks still go out
    /// whole and in order.
    #[test]
    fn a_line_longer_than_the_buffer_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.jsonl");
        let mut w = Lines::create(&path).unwrap();
        let mut want = Vec::new();
        for i in 0..5 {
            let line = format!("{i}:{}", "y".repeat(CHUNK * 3 / 2 + i));
            want.extend_from_slice(line.as_bytes());
            want.push(b'\n');
            w.line(|b| b.extend_from_slice(line.as_bytes())).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
