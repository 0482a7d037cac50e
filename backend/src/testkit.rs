//! Child processes for the integration tests of ping-backend and canary-proxy:
//! start a binary, learn its addresses from the ready line it prints, signal it,
//! wait for its exit and read its log. Compiled only with the `testkit` feature,
//! which only the tests turn on; nothing in production uses it.
//!
//! Both binaries print one line of JSON on stdout once they serve, e.g.
//! `{"listening":{"traffic":"127.0.0.1:41234","https":null,"admin":"127.0.0.1:41235"}}`
//! (`null` for a listener that is off). Logs stay on stderr. Tests read the
//! addresses from that line, not from log text, so a reworded log line cannot
//! break them.
//!
//! Every wait here has a deadline and panics with the child's stderr when it
//! passes, so a binary that hangs or crashes fails the test with its own log
//! instead of hanging it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How often a wait for the child's exit asks whether it has exited.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// A child process started by a test, its stdout and stderr read line by line.
///
/// Killed and reaped when dropped, so a failing test leaves no process behind.
pub struct Process {
    child: Child,
    /// The program, for messages.
    program: String,
    stdout: Arc<Pipe>,
    stderr: Arc<Pipe>,
}

impl Process {
    /// Start `command` with stdin closed and stdout and stderr piped. A thread
    /// per pipe reads it to its end, so the child never blocks on a full pipe
    /// however much it logs and whether or not the test reads it.
    ///
    /// Panics if the program cannot be started.
    pub fn spawn(command: &mut Command) -> Process {
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {program}: {err}"));
        let stdout = Pipe::drain(child.stdout.take().expect("stdout is piped"));
        let stderr = Pipe::drain(child.stderr.take().expect("stderr is piped"));
        Process {
            child,
            program,
            stdout,
            stderr,
        }
    }

    /// Run `command` to its exit, for a binary expected to stop by itself (a
    /// start-up error): its exit status and its whole stderr. Panics if it is
    /// still running after `timeout`.
    pub fn run_to_exit(command: &mut Command, timeout: Duration) -> (ExitStatus, String) {
        let mut process = Process::spawn(command);
        let status = process.wait_exit(timeout);
        (status, process.stderr_text())
    }

    /// Wait up to `timeout` for the ready line on stdout and return the
    /// addresses in it. Panics, with the stderr so far, if the process exits or
    /// the timeout passes first, or if the line is malformed.
    pub fn listening(&mut self, timeout: Duration) -> Listening {
        let deadline = Instant::now() + timeout;
        let found = self.stdout.wait_until(deadline, |state| {
            let ready = state.lines.iter().find_map(|line| Listening::parse(line));
            match ready {
                Some(parsed) => Some(parsed),
                None if state.closed => Some(Err("stdout closed before it".to_owned())),
                None => None,
            }
        });
        match found {
            Some(Ok(listening)) => listening,
            Some(Err(problem)) => {
                // Stdout closes as the process exits: wait for the exit status
                // and the rest of stderr, which say why.
                let closed = self.stdout.lock().closed;
                let exited = if closed {
                    self.exit_by(deadline)
                } else {
                    self.try_wait()
                };
                if exited.is_some() {
                    self.stderr
                        .wait_until(deadline, |state| state.closed.then_some(()));
                }
                let exited = exited.map_or_else(|| "still running".to_owned(), |s| s.to_string());
                panic!(
                    "{}: no ready line ({problem}; {exited}); stdout: {:#?}; stderr: {:#?}",
                    self.program,
                    self.stdout.lines(),
                    self.stderr.lines()
                )
            }
            None => panic!(
                "{}: no ready line on stdout within {timeout:?}; stdout: {:#?}; stderr: {:#?}",
                self.program,
                self.stdout.lines(),
                self.stderr.lines()
            ),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Send signal `name` ("TERM", "INT", ...) with the `kill` command, so the
    /// tests need no unsafe `libc` call. Panics if `kill` fails.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.id().to_string())
            .status()
            .expect("the kill command runs");
        assert!(status.success(), "kill -{name} {} failed", self.id());
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .expect("the child's status is readable")
    }

    /// Wait up to `timeout` for the process to exit and for its stdout and
    /// stderr to close, so [`Process::stderr_lines`] is then the whole log.
    /// Panics, with the stderr so far, if either takes longer.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let Some(status) = self.exit_by(deadline) else {
            panic!(
                "{} did not exit within {timeout:?}; stderr: {:#?}",
                self.program,
                self.stderr.lines()
            )
        };
        for (name, pipe) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            // Open after the exit only if a child of the process still holds it.
            let closed = pipe.wait_until(deadline, |state| state.closed.then_some(()));
            assert!(
                closed.is_some(),
                "{} exited ({status}) but its {name} is still open after {timeout:?}",
                self.program
            );
        }
        status
    }

    /// The exit status, or `None` if the process is still running at
    /// `deadline`. The standard library has no wait with a timeout, so this
    /// polls.
    fn exit_by(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(EXIT_POLL);
        }
    }

    /// Resident set size in bytes, from `/proc/<id>/status`; 0 if it cannot be
    /// read (the process is gone, or this is not Linux).
    pub fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// The stderr lines read so far (all of them after [`Process::wait_exit`]).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lines()
    }

    /// [`Process::stderr_lines`] as one text, each line ended by `\n`.
    pub fn stderr_text(&self) -> String {
        self.stderr
            .lines()
            .into_iter()
            .map(|line| line + "\n")
            .collect()
    }

    /// The stdout lines read so far, the ready line included.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lines()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Errors mean the process is already gone, which is the goal.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The addresses in a ready line, by listener name: `None` for a listener
/// that is turned off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening(BTreeMap<String, Option<SocketAddr>>);

impl Listening {
    /// `None` if `line` is not a ready line (any other output), else the
    /// addresses in it, or what is wrong with it.
    pub fn parse(line: &str) -> Option<Result<Listening, String>> {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let listeners = value.get("listening")?;
        let malformed = || format!("malformed ready line: {line}");
        let Some(listeners) = listeners.as_object() else {
            return Some(Err(malformed()));
        };
        let mut out = BTreeMap::new();
        for (name, addr) in listeners {
            let addr = match addr {
                serde_json::Value::Null => None,
                serde_json::Value::String(addr) => match addr.parse() {
                    Ok(addr) => Some(addr),
                    Err(_) => return Some(Err(malformed())),
                },
                _ => return Some(Err(malformed())),
            };
            out.insert(name.clone(), addr);
        }
        Some(Ok(Listening(out)))
    }

    /// The address of listener `name`, or `None` if it is turned off. Panics if
    /// the line does not name it: a typo in the test, or a binary that changed
    /// its ready line.
    pub fn get(&self, name: &str) -> Option<SocketAddr> {
        match self.0.get(name) {
            Some(addr) => *addr,
            None => panic!("the ready line names no listener {name:?}: {self:?}"),
        }
    }

    /// The address of listener `name`; panics if it is turned off or not named.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.get(name)
            .unwrap_or_else(|| panic!("listener {name:?} is turned off: {self:?}"))
    }

    /// Every listener by name.
    pub fn all(&self) -> &BTreeMap<String, Option<SocketAddr>> {
        &self.0
    }
}

/// The lines read so far from one of the child's pipes, and whether it has
/// closed; waiters are woken at each change, so nothing here sleeps.
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    changed: Condvar,
}

#[derive(Default)]
struct PipeState {
    lines: Vec<String>,
    closed: bool,
}

impl Pipe {
    /// Read `source` to its end on a thread of its own.
    fn drain(source: impl Read + Send + 'static) -> Arc<Pipe> {
        let pipe = Arc::new(Pipe::default());
        let sink = pipe.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(source);
            let mut line = Vec::new();
            // An error other than EINTR (which read_until retries) ends the
            // pipe as EOF does.
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                let text = text.strip_suffix(b"\r").unwrap_or(text);
                // Lossy: an invalid byte must not stop the reading, or the pipe
                // would fill and block the child.
                let text = String::from_utf8_lossy(text).into_owned();
                sink.lock().lines.push(text);
                sink.changed.notify_all();
                line.clear();
            }
            sink.lock().closed = true;
            sink.changed.notify_all();
        });
        pipe
    }

    /// A panic in a test thread holding the lock leaves the lines intact.
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// Wait until `found` returns `Some` (checked at each change), or `None`
    /// once `deadline` has passed.
    fn wait_until<T>(
        &self,
        deadline: Instant,
        mut found: impl FnMut(&PipeState) -> Option<T>,
    ) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(value) = found(&state) {
                return Some(value);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_line_gives_each_listener_or_none() {
        let line =
            r#"{"listening":{"traffic":"127.0.0.1:41234","https":null,"admin":"[::1]:9090"}}"#;
        let listening = Listening::parse(line).unwrap().unwrap();
        assert_eq!(
            listening.addr("traffic"),
            "127.0.0.1:41234".parse().unwrap()
        );
        assert_eq!(listening.get("https"), None);
        assert_eq!(listening.addr("admin"), "[::1]:9090".parse().unwrap());
        assert_eq!(listening.all().len(), 3);
    }

    #[test]
    fn other_output_is_not_a_ready_line() {
        for line in [
            "",
            "listening on 127.0.0.1:8080",
            "{}",
            r#"{"status":"ok"}"#,
        ] {
            assert_eq!(Listening::parse(line), None, "{line:?}");
        }
    }

    #[test]
    fn a_malformed_ready_line_is_reported() {
        for line in [
            r#"{"listening":["127.0.0.1:1"]}"#,
            r#"{"listening":{"addr":"localhost"}}"#,
            r#"{"listening":{"addr":8080}}"#,
        ] {
            let err = Listening::parse(line).unwrap().unwrap_err();
            assert!(err.contains(line), "{err}");
        }
    }

    #[test]
    #[should_panic(expected = "names no listener \"tls\"")]
    fn asking_for_an_unnamed_listener_panics() {
        let line = r#"{"listening":{"addr":"127.0.0.1:1"}}"#;
        Listening::parse(line).unwrap().unwrap().get("tls");
    }

    /// A command that runs a shell script, for tests of the kit itself.
    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn the_ready_line_is_found_among_other_output_and_stderr_is_kept() {
        let mut process = Process::spawn(&mut sh(
            r#"echo starting >&2; echo banner; echo '{"listening":{"addr":"127.0.0.1:5"}}'; exec sleep 600"#,
        ));
        let listening = process.listening(Duration::from_secs(10));
        assert_eq!(listening.addr("addr"), "127.0.0.1:5".parse().unwrap());
        assert_eq!(process.stdout_lines()[0], "banner");
        process.signal("TERM");
        let status = process.wait_exit(Duration::from_secs(10));
        assert!(!status.success());
        assert_eq!(process.stderr_text(), "starting\n");
    }

    #[test]
    fn an_exit_before_the_ready_line_panics_with_the_log() {
        let mut process = Process::spawn(&mut sh("echo 'error: no routes file' >&2; exit 3"));
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            process.listening(Duration::from_secs(10))
        }))
        .unwrap_err();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(message.contains("error: no routes file"), "{message}");
        assert!(message.contains("exit status: 3"), "{message}");
    }

    #[test]
    fn run_to_exit_returns_the_status_and_the_whole_stderr() {
        let (status, stderr) = Process::run_to_exit(
            &mut sh("echo one >&2; echo two >&2; exit 1"),
            Duration::from_secs(10),
        );
        assert_eq!(status.code(), Some(1));
        assert_eq!(stderr, "one\ntwo\n");
    }
}
