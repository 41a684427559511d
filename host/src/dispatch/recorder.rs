//! Group commit of outcomes: every task hands its completions to one writer, which
//! records whatever has queued up in a single store transaction. Under load a
//! transaction carries hundreds of outcomes instead of a handful, which is what the
//! database's commit and per-statement costs need; when idle it writes at once, so
//! latency does not wait for a batch to fill.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

use crate::store::{Completion, CompletionResult, EventStore};

/// Most completions one transaction records.
const MAX_GROUP: usize = 1_000;

/// A group smaller than this waits up to `LINGER` for more: at a low, steady rate every
/// outcome would otherwise be its own transaction (nine statements and a WAL flush each),
/// and that work competes for the CPU with the deliveries still on their way. The wait
/// comes after the plugin call, so it never delays an effect, only its record.
const SMALL_GROUP: usize = 32;
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// Transactions in flight at once: while one group commits, the next one is written.
const WRITERS: usize = 2;

/// Why a task's completions were not recorded: the store refused the transaction.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RecordError(String);

struct Submission {
    completions: Vec<Completion>,
    reply: oneshot::Sender<Result<Vec<CompletionResult>, RecordError>>,
}

#[derive(Clone)]
pub(super) struct Recorder {
    queue: mpsc::UnboundedSender<Submission>,
}

impl Recorder {
    /// Start the writer; it runs until the last `Recorder` clone is dropped.
    pub fn start(store: Arc<dyn EventStore>) -> Self {
        let (queue, submissions) = mpsc::unbounded_channel();
        let submissions = Arc::new(Mutex::new(submissions));
        for _ in 0..WRITERS {
            tokio::spawn(write_groups(store.clone(), submissions.clone()));
        }
        Recorder { queue }
    }

    /// Record these completions (in one transaction with whatever else is queued) and
    /// return their results in order.
    pub async fn record(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<CompletionResult>, RecordError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Submission { completions, reply })
            .map_err(|_| RecordError("the outcome writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| RecordError("the outcome writer stopped before answering".into()))?
    }
}

/// Take what has queued up (waiting for at least one submission), up to `MAX_GROUP`
/// completions; `None` once every `Recorder` is gone.
async fn next_group(
    submissions: &Mutex<mpsc::UnboundedReceiver<Submission>>,
) -> Option<Vec<Submission>> {
    let mut submissions = submissions.lock().await;
    let first = submissions.recv().await?;
    let mut rows = first.completions.len();
    let mut group = vec![first];
    let linger_until = tokio::time::Instant::now() + LINGER;
    while rows < MAX_GROUP {
        let next = match submissions.try_recv() {
            Ok(next) => next,
            Err(_) if rows >= SMALL_GROUP => break,
            Err(_) => match tokio::time::timeout_at(linger_until, submissions.recv()).await {
                Ok(Some(next)) => next,
                Ok(None) | Err(_) => break,
            },
        };
        rows += next.completions.len();
        group.push(next);
    }
    Some(group)
}

async fn write_groups(
    store: Arc<dyn EventStore>,
    submissions: Arc<Mutex<mpsc::UnboundedReceiver<Submission>>>,
) {
    while let Some(group) = next_group(&submissions).await {
        write_group(store.as_ref(), group).await;
    }
}

async fn write_group(store: &dyn EventStore, group: Vec<Submission>) {
    if group.len() > 1 {
        let all: Vec<Completion> = group
            .iter()
            .flat_map(|s| s.completions.iter().cloned())
            .collect();
        match store.complete(&all).await {
            Ok(results) => {
                let mut results = results.into_iter();
                for submission in group {
                    let own: Vec<CompletionResult> = results
                        .by_ref()
                        .take(submission.completions.len())
                        .collect();
                    let _ = submission.reply.send(Ok(own));
                }
                return;
            }
            // One bad submission (say an emitted event the store refuses) must not fail
            // the others: write each on its own.
            Err(err) => {
                tracing::warn!(%err, submissions = group.len(), "a group of outcomes failed; recording each submission alone")
            }
        }
    }
    for submission in group {
        let result = store
            .complete(&submission.completions)
            .await
            .map_err(|err| RecordError(err.to_string()));
        let _ = submission.reply.send(result);
    }
}
