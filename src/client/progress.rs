//! Progress of one transfer: a bar redrawn in place on a terminal (bytes, rate, ETA), plain
//! lines otherwise (a CI log or a journal has no use for carriage returns).

use super::human_bytes;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counts the bytes of one file as they are sent; [`Progress::finish`] prints the total.
pub struct Progress {
    name: String,
    total: u64,
    /// Bytes already on the server before this run (resumed parts); not counted in the rate.
    skipped: u64,
    sent: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    start: Instant,
    drawer: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Starts reporting on stderr. `skipped` bytes are already there (a resumed upload).
    pub fn start(name: &str, total: u64, skipped: u64, parts: usize) -> Progress {
        let sent = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let tty = std::io::stderr().is_terminal();
        let start = Instant::now();
        let resumed = if skipped > 0 {
            format!(", resuming with {} already sent", human_bytes(skipped))
        } else {
            String::new()
        };
        if !tty {
            eprintln!(
                "uploading {name}: {} in {parts} part{}{resumed}",
                human_bytes(total),
                if parts == 1 { "" } else { "s" }
            );
        }
        let drawer = tty.then(|| {
            let (sent, done, name) = (sent.clone(), done.clone(), name.to_string());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    draw(&name, total, skipped, sent.load(Ordering::Relaxed), start);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        });
        Progress {
            name: name.to_string(),
            total,
            skipped,
            sent,
            done,
            start,
            drawer,
        }
    }

    /// A counter the senders add to.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }

    /// Stops the bar and prints one line with what was sent and how fast.
    pub fn finish(mut self, outcome: &str) {
        self.stop();
        let sent = self.sent.load(Ordering::Relaxed);
        let secs = self.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            format!(", {}/s", human_bytes((sent as f64 / secs) as u64))
        } else {
            String::new()
        };
        eprintln!(
            "{}: {outcome}: sent {} of {} in {secs:.1} s{rate}{}",
            self.name,
            human_bytes(sent),
            human_bytes(self.total),
            if self.skipped > 0 {
                format!(
                    " ({} were already on the server)",
                    human_bytes(self.skipped)
                )
            } else {
                String::new()
            }
        );
    }

    fn stop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(d) = self.drawer.take() {
            let _ = d.join();
            // Clear the bar's line.
            eprint!("\r\x1b[2K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}

fn draw(name: &str, total: u64, skipped: u64, sent: u64, start: Instant) {
    let have = (skipped + sent).min(total);
    let frac = if total == 0 {
        1.0
    } else {
        have as f64 / total as f64
    };
    const WIDTH: usize = 30;
    let filled = (frac * WIDTH as f64) as usize;
    let secs = start.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { sent as f64 / secs } else { 0.0 };
    let eta = if rate > 0.0 {
        let left = (total - have) as f64 / rate;
        format!("{}:{:02}", (left as u64) / 60, (left as u64) % 60)
    } else {
        "--:--".to_string()
    };
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r\x1b[2K{name} [{}{}] {} / {} {}/s ETA {eta}",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled),
        human_bytes(have),
        human_bytes(total),
        human_bytes(rate as u64),
    );
    let _ = err.flush();
}

/// A reader that adds every byte it yields to a counter.
pub struct Counting<R> {
    pub inner: R,
    pub counter: Arc<AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
