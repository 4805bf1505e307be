//! The tokio pieces shared by the task tests: a two-worker multi-thread runtime and a task
//! that allocates across yields, so that its polls land on either worker.

use beancounter::BcId;

/// One chunk a task allocates after each yield: 32 KiB, a size class of its own, so charged
/// exactly.
pub const CHUNK: usize = 32 << 10;
/// Chunks per task.
pub const CHUNKS: usize = 8;
/// What one task holds at the end.
pub const TASK_BYTES: u64 = (CHUNK * CHUNKS) as u64;

/// A multi-thread runtime with two workers, timers and I/O on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Allocates `CHUNKS` chunks, one after each yield, checking every time that it still runs
/// in `tenant`; returns them.
pub async fn hopping_chunks(tenant: BcId) -> Vec<Vec<u8>> {
    let mut chunks = Vec::with_capacity(CHUNKS);
    for i in 0..CHUNKS {
        tokio::task::yield_now().await;
        assert_eq!(
            beancounter::current_id(),
            tenant,
            "poll {i} outside the tenant"
        );
        chunks.push(vec![i as u8; CHUNK]);
    }
    chunks
}
