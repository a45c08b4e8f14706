//! The serial console's host side: a bounded buffer of everything the guest printed, an optional live copy to
//! a writer (the daemon's log, or stdout for `shale vm run`), and a way to wait for text (tests, boot checks).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How much console output is kept (older bytes are dropped).
pub const CONSOLE_KEEP: usize = 1 << 20;

/// Guest console output.
pub struct Console {
    state: Mutex<State>,
    cond: Condvar,
}

struct State {
    buf: VecDeque<u8>,
    total: u64,
    tee: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("total", &self.state.lock().total)
            .finish()
    }
}

impl Console {
    /// A console that keeps output and also copies it to `tee` as it arrives.
    pub fn new(tee: Option<Box<dyn Write + Send>>) -> Arc<Self> {
        Arc::new(Console {
            state: Mutex::new(State {
                buf: VecDeque::new(),
                total: 0,
                tee,
            }),
            cond: Condvar::new(),
        })
    }

    /// Everything kept so far (the last [`CONSOLE_KEEP`] bytes).
    pub fn output(&self) -> Vec<u8> {
        self.state.lock().buf.iter().copied().collect()
    }

    /// The kept output as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output()).into_owned()
    }

    /// Total bytes the guest has written since boot.
    pub fn total(&self) -> u64 {
        self.state.lock().total
    }

    /// Wait until the kept output contains `needle`, up to `timeout`. True if it appeared.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        loop {
            let (a, b) = st.buf.as_slices();
            let mut hay = Vec::with_capacity(a.len() + b.len());
            hay.extend_from_slice(a);
            hay.extend_from_slice(b);
            if hay
                .windows(needle.len().max(1))
                .any(|w| w == needle.as_bytes())
            {
                return true;
            }
            if self.cond.wait_until(&mut st, deadline).timed_out() {
                return false;
            }
        }
    }

    pub(crate) fn push(&self, bytes: &[u8]) {
        let mut st = self.state.lock();
        st.total += bytes.len() as u64;
        st.buf.extend(bytes.iter().copied());
        let excess = st.buf.len().saturating_sub(CONSOLE_KEEP);
        st.buf.drain(..excess);
        if let Some(t) = st.tee.as_mut() {
            // The guest must never stall on a slow or broken log sink.
            let _ = t.write_all(bytes).and_then(|_| t.flush());
        }
        drop(st);
        self.cond.notify_all();
    }
}

/// The `Write` end handed to the 16550 model.
pub(crate) struct ConsoleWriter(pub(crate) Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
