//! Where log lines go. Commands write each line to stderr as it comes. The server gathers its
//! info lines and a thread writes them in batches: writing each request's line was a tenth of
//! a token call's CPU (BENCHMARKS.md). A quiet server's line is written at once; under load,
//! the lines of the next few milliseconds go out in one write. Warnings and errors are written
//! at once, after every line before them; so is everything left at exit (`Flush`) and before
//! a panic's message.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long the writer lets lines gather after writing a batch.
const GATHER: Duration = Duration::from_millis(2);
/// Gathered lines past this size are written at once, so a burst cannot grow the buffer.
const MAX_GATHERED: usize = 1 << 20;

/// Log lines' destination, as `tracing_subscriber`'s fmt layer asks for a writer per line.
#[derive(Clone)]
pub(super) struct LogLines {
    batch: Option<Arc<Batch>>,
}

/// Writes what is left of a batched destination when dropped.
pub(super) struct Flush(Option<Arc<Batch>>);

impl Drop for Flush {
    fn drop(&mut self) {
        if let Some(batch) = &self.0 {
            batch.write_through(b"");
        }
    }
}

impl LogLines {
    /// Each line written to stderr as it comes.
    pub(super) fn direct() -> Self {
        Self { batch: None }
    }

    /// Info and lower lines gathered and written by a thread of their own; each line as it
    /// comes if that thread cannot start.
    pub(super) fn batched() -> (Self, Flush) {
        let batch = Arc::new(Batch::new(Box::new(io::stderr())));
        let writer = Arc::clone(&batch);
        let started = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.write_batches());
        if started.is_err() {
            return (Self::direct(), Flush(None));
        }
        flush_before_panics(Arc::clone(&batch));
        (
            Self {
                batch: Some(Arc::clone(&batch)),
            },
            Flush(Some(batch)),
        )
    }
}

impl<'a> MakeWriter<'a> for LogLines {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            batch: self.batch.as_deref(),
            at_once: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            batch: self.batch.as_deref(),
            at_once: *meta.level() <= Level::WARN,
        }
    }
}

/// One line's writer: the fmt layer formats a line, then writes it whole.
pub(super) struct LineWriter<'a> {
    batch: Option<&'a Batch>,
    at_once: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.write_all(line)?;
        Ok(line.len())
    }

    fn write_all(&mut self, line: &[u8]) -> io::Result<()> {
        match self.batch {
            None => io::stderr().write_all(line),
            Some(batch) if self.at_once => {
                batch.write_through(line);
                Ok(())
            }
            Some(batch) => {
                batch.gather(line);
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Batch {
    gathered: Mutex<Gathered>,
    /// Wakes the idle writer thread.
    arrived: Condvar,
    /// Held while taking gathered lines and writing them, so lines leave in their order.
    out: Mutex<Box<dyn Write + Send>>,
}

#[derive(Default)]
struct Gathered {
    lines: Vec<u8>,
    /// The writer thread waits for `arrived`.
    writer_idle: bool,
}

impl Batch {
    fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            gathered: Mutex::default(),
            arrived: Condvar::new(),
            out: Mutex::new(out),
        }
    }

    fn gather(&self, line: &[u8]) {
        let mut gathered = locked(&self.gathered);
        if gathered.lines.len() + line.len() > MAX_GATHERED {
            drop(gathered);
            return self.write_through(line);
        }
        gathered.lines.extend_from_slice(line);
        if gathered.writer_idle {
            gathered.writer_idle = false;
            self.arrived.notify_one();
        }
    }

    /// Writes the gathered lines, then `line`. A log line that cannot be written has nowhere
    /// to be reported, so write errors are dropped, as the fmt layer drops them.
    fn write_through(&self, line: &[u8]) {
        let mut out = locked(&self.out);
        let lines = std::mem::take(&mut locked(&self.gathered).lines);
        let _ = out.write_all(&lines);
        let _ = out.write_all(line);
        let _ = out.flush();
    }

    fn write_batches(&self) {
        loop {
            let mut gathered = locked(&self.gathered);
            while gathered.lines.is_empty() {
                gathered.writer_idle = true;
                gathered = self
                    .arrived
                    .wait(gathered)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            drop(gathered);
            self.write_through(b"");
            std::thread::sleep(GATHER);
        }
    }
}

/// Writes the gathered lines before the panic hook in place reports a panic, so the lines
/// that led up to it come first.
fn flush_before_panics(batch: Arc<Batch>) {
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |panic| {
        batch.write_through(b"");
        report_panic(panic);
    }));
}

/// A writer that panicked mid-line leaves at worst a partial line behind.
fn locked<T>(guarded: &Mutex<T>) -> MutexGuard<'_, T> {
    guarded.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the batch wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl Write for Written {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            locked(&self.0).extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Written {
        fn text(&self) -> String {
            String::from_utf8(locked(&self.0).clone()).unwrap()
        }
    }

    fn writer(batch: &Batch, at_once: bool) -> LineWriter<'_> {
        LineWriter {
            batch: Some(batch),
            at_once,
        }
    }

    #[test]
    fn gathered_lines_wait_for_the_writer_and_a_warning_goes_out_after_them() {
        let written = Written::default();
        let batch = Arc::new(Batch::new(Box::new(written.clone())));
        writer(&batch, false).write_all(b"one\n").unwrap();
        writer(&batch, false).write_all(b"two\n").unwrap();
        assert_eq!(written.text(), "", "gathered, not yet written");
        writer(&batch, true).write_all(b"warning\n").unwrap();
        assert_eq!(written.text(), "one\ntwo\nwarning\n");
        writer(&batch, false).write_all(b"three\n").unwrap();
        assert_eq!(written.text(), "one\ntwo\nwarning\n");
        drop(Flush(Some(Arc::clone(&batch))));
        assert_eq!(written.text(), "one\ntwo\nwarning\nthree\n");
    }

    #[test]
    fn gathered_lines_are_written_before_a_panic_is_reported() {
        let written = Written::default();
        let batch = Arc::new(Batch::new(Box::new(written.clone())));
        writer(&batch, false)
            .write_all(b"before the panic\n")
            .unwrap();
        flush_before_panics(Arc::clone(&batch));
        let panicked = std::panic::catch_unwind(|| panic!("on purpose"));
        assert!(panicked.is_err());
        assert_eq!(written.text(), "before the panic\n");
    }

    #[test]
    fn the_writer_thread_writes_what_gathers_and_a_flood_loses_nothing() {
        let written = Written::default();
        let batch = Arc::new(Batch::new(Box::new(written.clone())));
        let thread = Arc::clone(&batch);
        std::thread::spawn(move || thread.write_batches());
        writer(&batch, false).write_all(b"quiet\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while written.text().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(written.text(), "quiet\n");

        // More than the buffer holds: the overflowing line is written through, nothing lost.
        let line = vec![b'x'; MAX_GATHERED / 2 + 1];
        let flush = Flush(Some(Arc::clone(&batch)));
        writer(&batch, false).write_all(&line).unwrap();
        writer(&batch, false).write_all(&line).unwrap();
        drop(flush);
        assert_eq!(written.text().len(), "quiet\n".len() + 2 * line.len());
    }
}
