//! Running the AWS CLI without trusting it: it runs in a process group of its own that
//! is killed as a whole at its deadline (and once it exits, so a background child it
//! left cannot hold its pipes open), its stdout and stderr are drained concurrently
//! and capped (a chatty CLI cannot fill a pipe and stall), and waiting for the drains is
//! bounded too.

use rustix::process::{Pid, Signal, kill_process_group};
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes kept of each output stream; more is read and dropped.
const OUTPUT_CAP: usize = 64 * 1024;
/// How long the drains may take to see end-of-file once the group is killed (a
/// descendant that left the group can still hold a pipe; its drain is then left behind).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What one run gave.
#[derive(Debug)]
pub(crate) struct CliOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CliOutput {
    /// The last non-empty line of stderr, where the AWS CLI puts its error.
    pub(crate) fn error_line(&self) -> String {
        String::from_utf8_lossy(&self.stderr)
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .trim()
            .to_owned()
    }
}

/// Why a run did not give an output.
#[derive(Debug)]
pub(crate) enum CliError {
    /// It could not be started (missing, not executable).
    Spawn(io::Error),
    /// It ran past its deadline; its process group was killed.
    TimedOut,
    Wait(io::Error),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Spawn(e) => write!(f, "cannot run it: {e}"),
            CliError::TimedOut => {
                write!(f, "it did not finish in time; killed it and its children")
            }
            CliError::Wait(e) => write!(f, "waiting for it failed: {e}"),
        }
    }
}

/// Runs `command` with `stdin` until it exits or the deadline passes, whichever is
/// first. `deadline` is asked again whenever `alarm` rings: a stop may bring it forward.
pub(crate) fn run(
    mut command: Command,
    stdin: Stdio,
    deadline: impl Fn() -> Instant,
    alarm: &Alarm,
) -> Result<CliOutput, CliError> {
    command
        .process_group(0)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(CliError::Spawn)?;
    let (sender, drained) = mpsc::channel();
    for (index, pipe) in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        if let Some(pipe) = pipe {
            let sender = sender.clone();
            // A drain that cannot start leaves that stream empty; nothing waits on it.
            let _ = thread::Builder::new()
                .name("aws-cli-output".into())
                .spawn(move || {
                    let _ = sender.send((index, drain(pipe)));
                });
        }
    }
    drop(sender);
    let pid = Pid::from_child(&child);
    let waited = wait_until(child, pid, deadline, alarm);
    // Whatever it left running goes with it: nothing may outlive a run.
    let _ = kill_process_group(pid, Signal::KILL);
    let status = match waited {
        Ok(Some(status)) => status,
        Ok(None) => return Err(CliError::TimedOut),
        Err(e) => return Err(CliError::Wait(e)),
    };
    let mut outputs = [Vec::new(), Vec::new()];
    let grace = Instant::now() + DRAIN_GRACE;
    while let Ok((index, bytes)) =
        drained.recv_timeout(grace.saturating_duration_since(Instant::now()))
    {
        outputs[index] = bytes;
    }
    let [stdout, stderr] = outputs;
    Ok(CliOutput {
        status,
        stdout,
        stderr,
    })
}

/// Waits for `child` to exit, or for `deadline()` to pass (the group is killed then and
/// `None` returned). A thread of the run's own blocks in `wait`, and rings `alarm` when
/// the child exits; whoever moves the deadline rings it too, so nothing is polled.
fn wait_until(
    mut child: Child,
    pid: Pid,
    deadline: impl Fn() -> Instant,
    alarm: &Alarm,
) -> io::Result<Option<ExitStatus>> {
    let exited = AtomicBool::new(false);
    thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            let waited = child.wait();
            // Set before the ring: a look that missed the ring sees the flag.
            exited.store(true, SeqCst);
            alarm.ring();
            waited
        });
        let mut timed_out = false;
        loop {
            let seen = alarm.rung();
            if exited.load(SeqCst) {
                break;
            }
            let until = deadline();
            if Instant::now() >= until {
                // The child leads its group: this ends its `wait` too.
                let _ = kill_process_group(pid, Signal::KILL);
                timed_out = true;
                break;
            }
            alarm.wait(seen, until);
        }
        let status = waiter
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the waiting thread panicked")))?;
        Ok((!timed_out).then_some(status))
    })
}

/// A bell rung when a run may have to look again: its child exited, or its deadline
/// moved (a stop). Counting rings means one that comes between a look and the wait is
/// not lost.
#[derive(Debug, Default)]
pub(crate) struct Alarm {
    rings: Mutex<u64>,
    bell: Condvar,
}

impl Alarm {
    pub(crate) fn ring(&self) {
        *self.rings.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.bell.notify_all();
    }

    pub(crate) fn rung(&self) -> u64 {
        *self.rings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until it rings after `seen` rings, or `until`.
    pub(crate) fn wait(&self, seen: u64, until: Instant) {
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        while *rings == seen {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            rings = self
                .bell
                .wait_timeout(rings, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Reads `pipe` to its end, keeping the first `OUTPUT_CAP` bytes.
fn drain(mut pipe: Box<dyn Read + Send>) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut block = [0u8; 8192];
    loop {
        match pipe.read(&mut block) {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = OUTPUT_CAP.saturating_sub(kept.len());
                kept.extend_from_slice(&block[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    fn soon(seconds: u64) -> impl Fn() -> Instant {
        let at = Instant::now() + Duration::from_secs(seconds);
        move || at
    }

    #[test]
    fn output_and_status_come_back() {
        let out = run(
            sh("echo out; echo err >&2; exit 3"),
            Stdio::null(),
            soon(10),
            &Alarm::default(),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.error_line(), "err");
    }

    #[test]
    fn a_background_child_holding_the_pipes_does_not_hold_the_caller() {
        let started = Instant::now();
        let out = run(
            sh("sleep 30 & echo gone >&2; exit 254"),
            Stdio::null(),
            soon(20),
            &Alarm::default(),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(254));
        assert_eq!(out.error_line(), "gone");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn more_output_than_a_pipe_holds_is_drained_and_capped() {
        let out = run(
            sh("head -c 1000000 /dev/zero | tr '\\0' x >&2; echo last >&2"),
            Stdio::null(),
            soon(20),
            &Alarm::default(),
        )
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stderr.len(), OUTPUT_CAP);
    }

    /// True once process `pid` is gone or a zombie (dead, waiting to be reaped).
    fn dead(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'))
        })
    }

    #[test]
    fn past_the_deadline_the_whole_group_is_killed() {
        let pid_file = std::env::temp_dir().join(format!("aws-cli-group-{}", std::process::id()));
        let script = format!("sleep 30 & echo $! > {}; sleep 30", pid_file.display());
        let started = Instant::now();
        let at = Instant::now() + Duration::from_millis(500);
        let result = run(sh(&script), Stdio::null(), || at, &Alarm::default());
        assert!(matches!(result, Err(CliError::TimedOut)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let _ = std::fs::remove_file(&pid_file);
        let limit = Instant::now() + Duration::from_secs(5);
        while !dead(pid.trim()) {
            assert!(
                Instant::now() < limit,
                "the background child {pid} outlived the deadline"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let result = run(
            Command::new("/nonexistent/aws"),
            Stdio::null(),
            soon(5),
            &Alarm::default(),
        );
        assert!(matches!(result, Err(CliError::Spawn(_))), "{result:?}");
    }

    #[test]
    fn a_deadline_brought_forward_ends_the_run_when_the_alarm_rings() {
        let deadline = Mutex::new(Instant::now() + Duration::from_secs(600));
        let alarm = Alarm::default();
        let started = Instant::now();
        let result = thread::scope(|scope| {
            scope.spawn(|| {
                thread::sleep(Duration::from_millis(200));
                *deadline.lock().unwrap() = Instant::now();
                alarm.ring();
            });
            run(
                sh("sleep 30"),
                Stdio::null(),
                || *deadline.lock().unwrap(),
                &alarm,
            )
        });
        assert!(matches!(result, Err(CliError::TimedOut)), "{result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_quick_exit_is_seen_at_once_not_at_the_deadline() {
        // An exit that rang between a look and the wait was once missed until the
        // deadline: many short runs with a far deadline find that.
        let started = Instant::now();
        for _ in 0..40 {
            let out = run(sh("exit 0"), Stdio::null(), soon(60), &Alarm::default()).unwrap();
            assert!(out.status.success());
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "an exit waited for the deadline"
            );
        }
    }
}
