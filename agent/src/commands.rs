//! Commands for running tasks (terminate, signal): queued per task attempt, handed to the
//! emissary's long-poll the moment they arrive (a `Notify` permit: no wake-up is ever lost).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::api::Command;
use tokio::sync::Notify;

/// Commands nobody collects are forgotten after this long.
const UNCLAIMED_TTL: Duration = Duration::from_secs(600);

type TaskKey = (String, u32);

#[derive(Default)]
pub struct Commands {
    slots: Mutex<HashMap<TaskKey, Slot>>,
    terminated: Mutex<HashSet<TaskKey>>,
}

struct Slot {
    queue: Vec<Command>,
    notify: Arc<Notify>,
    touched: Instant,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            queue: Vec::new(),
            notify: Arc::new(Notify::new()),
            touched: Instant::now(),
        }
    }
}

impl Commands {
    pub fn push(&self, task: &str, attempt: u32, command: Command) {
        let key = (task.to_owned(), attempt);
        if command == Command::Terminate {
            self.terminated.lock().unwrap().insert(key.clone());
        }
        let mut slots = self.slots.lock().unwrap();
        slots.retain(|_, s| s.touched.elapsed() < UNCLAIMED_TTL);
        let slot = slots.entry(key).or_insert_with(Slot::new);
        slot.queue.push(command);
        slot.touched = Instant::now();
        slot.notify.notify_one();
    }

    /// The commands for a task, waiting up to `wait` for the first.
    pub async fn wait(&self, task: &str, attempt: u32, wait: Duration) -> Vec<Command> {
        let key = (task.to_owned(), attempt);
        let notify = {
            let mut slots = self.slots.lock().unwrap();
            let slot = slots.entry(key.clone()).or_insert_with(Slot::new);
            slot.touched = Instant::now();
            if !slot.queue.is_empty() {
                return std::mem::take(&mut slot.queue);
            }
            slot.notify.clone()
        };
        let _ = tokio::time::timeout(wait, notify.notified()).await;
        let mut slots = self.slots.lock().unwrap();
        slots
            .get_mut(&key)
            .map(|s| std::mem::take(&mut s.queue))
            .unwrap_or_default()
    }

    /// Whether the controller asked this attempt to stop (its end is then `Aborted`).
    pub fn was_terminated(&self, task: &str, attempt: u32) -> bool {
        self.terminated
            .lock()
            .unwrap()
            .contains(&(task.to_owned(), attempt))
    }

    /// Task attempts currently polling or with queued commands (for heartbeats).
    pub fn active(&self) -> Vec<TaskKey> {
        let slots = self.slots.lock().unwrap();
        slots
            .iter()
            .filter(|(_, s)| s.touched.elapsed() < Duration::from_secs(90))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_command_pushed_before_the_poll_is_not_lost() {
        let commands = Commands::default();
        commands.push("t", 1, Command::Signal { signal: 10 });
        assert_eq!(
            commands.wait("t", 1, Duration::from_millis(1)).await,
            [Command::Signal { signal: 10 }]
        );
        assert!(
            commands
                .wait("t", 1, Duration::from_millis(1))
                .await
                .is_empty()
        );
        assert!(
            commands
                .wait("other", 1, Duration::from_millis(1))
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_waiting_poll_wakes_at_once() {
        let commands = Arc::new(Commands::default());
        let waiter = {
            let commands = commands.clone();
            tokio::spawn(async move { commands.wait("t", 0, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        commands.push("t", 0, Command::Terminate);
        assert_eq!(waiter.await.unwrap(), [Command::Terminate]);
        assert!(start.elapsed() < Duration::from_millis(50));
        assert!(commands.was_terminated("t", 0));
    }
}
