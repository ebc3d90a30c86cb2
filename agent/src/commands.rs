//! Commands for running tasks (terminate, signal): kept per task attempt and handed to every
//! container's long-poll (a containerSet runs one emissary per container, all with the
//! attempt's token), each command once per container, the moment it arrives. A command names
//! its workflow, or none to mean the task id in whichever workflow polls for it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::api::Command;
use tokio::sync::watch;

/// An attempt nobody polls or commands for this long is forgotten.
const IDLE_TTL: Duration = Duration::from_secs(600);
/// Commands kept per attempt; older ones are dropped (a poller that far behind misses them).
const LOG_LIMIT: usize = 64;

type TaskKey = (String, u32);

pub struct Commands {
    slots: Mutex<HashMap<TaskKey, Slot>>,
    /// Set at shutdown: every long-poll answers at once, so in-flight requests finish.
    closing: watch::Sender<bool>,
}

impl Default for Commands {
    fn default() -> Commands {
        Commands {
            slots: Mutex::default(),
            closing: watch::channel(false).0,
        }
    }
}

struct Slot {
    /// Commands `first..first + log.len()` of this attempt, with the workflow each is for.
    log: Vec<(Option<String>, Command)>,
    first: usize,
    /// Per (workflow, container): how many of the log it has been through.
    cursors: HashMap<(String, String), usize>,
    /// Bumped on every push; a waiting poll subscribes before it sleeps, so no push is missed.
    pushed: watch::Sender<()>,
    /// The workflows told to terminate this attempt (`None`: any).
    terminated: Vec<Option<String>>,
    touched: Instant,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            log: Vec::new(),
            first: 0,
            cursors: HashMap::new(),
            pushed: watch::channel(()).0,
            terminated: Vec::new(),
            touched: Instant::now(),
        }
    }

    /// What `container` of `workflow` has not been handed yet, marking it handed.
    fn take(&mut self, workflow: &str, container: &str) -> Vec<Command> {
        let end = self.first + self.log.len();
        let key = (workflow.to_owned(), container.to_owned());
        let cursor = self.cursors.entry(key).or_insert(0);
        let from = (*cursor).max(self.first) - self.first;
        *cursor = end;
        self.touched = Instant::now();
        self.log[from..]
            .iter()
            .filter(|(for_workflow, _)| for_workflow.as_deref().is_none_or(|w| w == workflow))
            .map(|(_, command)| *command)
            .collect()
    }
}

impl Commands {
    fn slot<'a>(slots: &'a mut HashMap<TaskKey, Slot>, task: &str, attempt: u32) -> &'a mut Slot {
        let key = (task.to_owned(), attempt);
        if !slots.contains_key(&key) {
            // The map grows only here, so idle attempts are forgotten here: not on every poll,
            // which would scan all of them twice per request.
            slots.retain(|_, s| s.touched.elapsed() < IDLE_TTL);
        }
        slots.entry(key).or_insert_with(Slot::new)
    }

    pub fn push(&self, workflow: Option<&str>, task: &str, attempt: u32, command: Command) {
        let mut slots = self.slots.lock().unwrap();
        let slot = Self::slot(&mut slots, task, attempt);
        let workflow = workflow.map(str::to_owned);
        if command == Command::Terminate {
            slot.terminated.push(workflow.clone());
        }
        slot.log.push((workflow, command));
        if slot.log.len() > LOG_LIMIT {
            slot.log.remove(0);
            slot.first += 1;
        }
        slot.touched = Instant::now();
        slot.pushed.send_replace(());
    }

    /// The commands `container` of a task has not had yet, waiting up to `wait` for the first.
    pub async fn wait(
        &self,
        (workflow, task, attempt): (&str, &str, u32),
        container: &str,
        wait: Duration,
    ) -> Vec<Command> {
        let mut closing = self.closing.subscribe();
        let mut pushed = {
            let mut slots = self.slots.lock().unwrap();
            let slot = Self::slot(&mut slots, task, attempt);
            let ready = slot.take(workflow, container);
            if !ready.is_empty() || *closing.borrow_and_update() {
                return ready;
            }
            slot.pushed.subscribe()
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = pushed.changed() => {}
            _ = closing.changed() => {}
        }
        let mut slots = self.slots.lock().unwrap();
        Self::slot(&mut slots, task, attempt).take(workflow, container)
    }

    /// Answers every long-poll now and every later one at once (the agent is stopping).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Whether the controller asked this attempt to stop (its end is then `Aborted`).
    pub fn was_terminated(&self, workflow: &str, task: &str, attempt: u32) -> bool {
        self.slots
            .lock()
            .unwrap()
            .get(&(task.to_owned(), attempt))
            .is_some_and(|s| {
                s.terminated
                    .iter()
                    .any(|w| w.as_deref().is_none_or(|w| w == workflow))
            })
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

    #[cfg(test)]
    fn attempts(&self) -> usize {
        self.slots.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::task::JoinHandle;

    use super::*;

    const NOW: Duration = Duration::from_millis(1);

    /// A long-poll of task `t` attempt 0 by `container`, running.
    fn poll(commands: &Arc<Commands>, container: &'static str) -> JoinHandle<Vec<Command>> {
        let commands = commands.clone();
        tokio::spawn(async move {
            commands
                .wait(("wf", "t", 0), container, Duration::from_secs(30))
                .await
        })
    }

    #[tokio::test]
    async fn a_command_pushed_before_the_poll_is_not_lost() {
        let commands = Commands::default();
        commands.push(None, "t", 1, Command::Signal { signal: 10 });
        assert_eq!(
            commands.wait(("wf", "t", 1), "main", NOW).await,
            [Command::Signal { signal: 10 }]
        );
        assert!(commands.wait(("wf", "t", 1), "main", NOW).await.is_empty());
        assert!(
            commands
                .wait(("wf", "other", 1), "main", NOW)
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_waiting_poll_wakes_at_once() {
        let commands = Arc::new(Commands::default());
        let waiter = poll(&commands, "main");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        commands.push(None, "t", 0, Command::Terminate);
        assert_eq!(waiter.await.unwrap(), [Command::Terminate]);
        assert!(start.elapsed() < Duration::from_millis(50));
        assert!(commands.was_terminated("wf", "t", 0));
    }

    #[tokio::test]
    async fn every_container_of_a_task_gets_every_command_once() {
        let commands = Arc::new(Commands::default());
        let waiters = [poll(&commands, "a"), poll(&commands, "b")];
        tokio::time::sleep(Duration::from_millis(20)).await;
        commands.push(None, "t", 0, Command::Terminate);
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), [Command::Terminate]);
        }
        // A container that polls later still gets it, and nobody gets it twice.
        assert_eq!(
            commands.wait(("wf", "t", 0), "c", NOW).await,
            [Command::Terminate]
        );
        assert!(commands.wait(("wf", "t", 0), "a", NOW).await.is_empty());
    }

    #[tokio::test]
    async fn a_command_for_one_workflow_reaches_only_its_task() {
        let commands = Commands::default();
        commands.push(Some("a"), "t", 0, Command::Terminate);
        commands.push(None, "t", 0, Command::Signal { signal: 10 });
        let poll = |workflow| commands.wait((workflow, "t", 0), "main", NOW);
        assert_eq!(
            poll("a").await,
            [Command::Terminate, Command::Signal { signal: 10 }]
        );
        assert_eq!(poll("b").await, [Command::Signal { signal: 10 }]);
        assert!(commands.was_terminated("a", "t", 0));
        assert!(!commands.was_terminated("b", "t", 0));
    }

    #[tokio::test]
    async fn closing_answers_waiting_polls() {
        let commands = Arc::new(Commands::default());
        let waiter = poll(&commands, "main");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        commands.close();
        assert!(waiter.await.unwrap().is_empty());
        assert!(
            commands
                .wait(("wf", "t", 0), "main", Duration::from_secs(30))
                .await
                .is_empty()
        );
        assert!(start.elapsed() < Duration::from_millis(50));
    }

    #[tokio::test]
    async fn the_log_is_bounded() {
        let commands = Commands::default();
        for signal in 0..(LOG_LIMIT as i32 + 10) {
            commands.push(None, "t", 0, Command::Signal { signal });
        }
        let got = commands.wait(("wf", "t", 0), "main", NOW).await;
        assert_eq!(got.len(), LOG_LIMIT);
        assert_eq!(got[0], Command::Signal { signal: 10 });
        assert_eq!(commands.attempts(), 1);
    }
}
