//! Thread context (DESIGN §3.4): exec and fork beancounters, guards, adopt, spawn wrappers.

use beancounter::{current_id, find_or_create, lookup, BcError, BcId, Beancounter, Limits};
use beancounter::{Resource, Severity};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

fn bc(id: u32) -> Beancounter {
    find_or_create(BcId(id)).unwrap()
}

fn exists(id: u32) -> bool {
    lookup(BcId(id)).is_some()
}

/// The fork beancounter of this thread, observed as where a crate-spawned thread starts.
fn fork_id() -> BcId {
    beancounter::thread::spawn(current_id)
        .unwrap()
        .join()
        .unwrap()
}

fn threads_held(b: &Beancounter) -> u64 {
    b.stat(Resource::Threads).held
}

/// Runs `f` on a fresh std thread (whose context starts, and ends, in the root), so tests
/// that change the context for good do not leak it into the test harness's thread.
fn on_fresh_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().unwrap()
}

#[test]
fn enter_sets_exec_and_fork_and_restores_both() {
    on_fresh_thread(|| {
        let t = bc(5001);
        assert_eq!((current_id(), fork_id()), (BcId::ROOT, BcId::ROOT));
        let g = t.enter();
        assert_eq!(current_id(), BcId(5001));
        assert_eq!(beancounter::current(), t);
        assert_eq!(fork_id(), BcId(5001));
        assert!(format!("{g:?}").contains("ExecGuard"));
        drop(g);
        assert_eq!((current_id(), fork_id()), (BcId::ROOT, BcId::ROOT));
        // Entering the root works too.
        let _g = t.enter();
        {
            let _r = beancounter::root().enter();
            assert_eq!((current_id(), fork_id()), (BcId::ROOT, BcId::ROOT));
        }
        assert_eq!((current_id(), fork_id()), (BcId(5001), BcId(5001)));
    });
}

#[test]
fn nested_guards_restore_in_lifo_order() {
    on_fresh_thread(|| {
        let (a, b, c) = (bc(5101), bc(5102), bc(5103));
        let ga = a.enter();
        let gb = b.enter();
        let gc = c.enter_exec();
        assert_eq!((current_id(), fork_id()), (BcId(5103), BcId(5102)));
        drop(gc);
        assert_eq!((current_id(), fork_id()), (BcId(5102), BcId(5102)));
        let gc = c.enter();
        let ga2 = a.enter_exec();
        assert_eq!((current_id(), fork_id()), (BcId(5101), BcId(5103)));
        drop(ga2);
        assert_eq!((current_id(), fork_id()), (BcId(5103), BcId(5103)));
        drop(gc);
        assert_eq!((current_id(), fork_id()), (BcId(5102), BcId(5102)));
        drop(gb);
        assert_eq!((current_id(), fork_id()), (BcId(5101), BcId(5101)));
        drop(ga);
        assert_eq!((current_id(), fork_id()), (BcId::ROOT, BcId::ROOT));
        // Every guard gave its references back: the beancounters can be freed.
        drop((a, b, c));
        assert!(!exists(5101) && !exists(5102) && !exists(5103));
    });
}

#[test]
fn enter_exec_changes_only_exec() {
    on_fresh_thread(|| {
        let (f, e) = (bc(5201), bc(5202));
        let _gf = f.enter();
        let ge = e.enter_exec();
        assert_eq!(current_id(), BcId(5202));
        assert_eq!(beancounter::current(), e);
        // A thread spawned now starts in the fork beancounter, not the exec one, and is
        // charged there.
        let (go, wait) = mpsc::channel::<()>();
        let h = beancounter::thread::spawn(move || {
            let id = current_id();
            wait.recv().unwrap();
            (id, fork_id())
        })
        .unwrap();
        assert_eq!((threads_held(&f), threads_held(&e)), (1, 0));
        go.send(()).unwrap();
        assert_eq!(h.join().unwrap(), (BcId(5201), BcId(5201)));
        assert_eq!((threads_held(&f), threads_held(&e)), (0, 0));
        drop(ge);
        assert_eq!((current_id(), fork_id()), (BcId(5201), BcId(5201)));
    });
}

#[test]
fn adopt_is_permanent() {
    on_fresh_thread(|| {
        let t = bc(5301);
        t.adopt();
        assert_eq!((current_id(), fork_id()), (BcId(5301), BcId(5301)));
        // The context holds the beancounter: dropping the handle does not free it.
        drop(t);
        assert!(exists(5301));
        assert_eq!(current_id(), BcId(5301));
        // Adopting another one replaces it, and gives back the reference to the first.
        bc(5302).adopt();
        assert_eq!((current_id(), fork_id()), (BcId(5302), BcId(5302)));
        assert!(
            !exists(5301),
            "the replaced context still holds a reference"
        );
        assert!(exists(5302));
    });
    // Thread exit released the context's references.
    assert!(
        !exists(5302),
        "thread exit did not release the adopted beancounter"
    );
}

#[test]
fn adopt_inside_a_guard_is_undone_by_the_guard() {
    on_fresh_thread(|| {
        let (a, b) = (bc(5401), bc(5402));
        let g = a.enter();
        b.adopt();
        assert_eq!((current_id(), fork_id()), (BcId(5402), BcId(5402)));
        drop(g);
        assert_eq!((current_id(), fork_id()), (BcId::ROOT, BcId::ROOT));
        drop((a, b));
        assert!(!exists(5401) && !exists(5402), "references leaked");
    });
}

#[test]
fn out_of_order_guard_drop_panics_and_keeps_references_balanced() {
    on_fresh_thread(|| {
        let (a, b) = (bc(5501), bc(5502));
        let ga = a.enter();
        let gb = b.enter();
        let r = catch_unwind(AssertUnwindSafe(move || drop(ga)));
        let msg = r.expect_err("dropping the outer guard first did not panic");
        let msg = msg
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| msg.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("out of order"), "{msg:?}");
        // The inner guard is now out of order as well.
        assert!(catch_unwind(AssertUnwindSafe(move || drop(gb))).is_err());
        drop((a, b));
    });
    // Whatever the context was left holding, thread exit gave it back.
    assert!(!exists(5501) && !exists(5502), "references leaked");
}

#[test]
fn out_of_order_guard_drop_restores_the_original_context() {
    // After an out-of-order drop has been reported (and caught, as an executor catching a
    // task's panic would), once every guard is gone the thread must be back where it was
    // before the first one: not left charging a tenant, nor keeping it alive, for good.
    on_fresh_thread(|| {
        let (a, b) = (bc(5601), bc(5602));
        let ga = a.enter();
        let gb = b.enter();
        let _ = catch_unwind(AssertUnwindSafe(move || {
            drop(ga);
            drop(gb);
        }));
        let ids = (current_id(), fork_id());
        drop((a, b));
        assert_eq!(
            ids,
            (BcId::ROOT, BcId::ROOT),
            "all guards dropped, but the thread still runs in a tenant"
        );
        assert!(
            !exists(5601) && !exists(5602),
            "the context kept a tenant alive"
        );
    });
}

#[test]
fn spawned_thread_starts_in_the_parent_fork() {
    on_fresh_thread(|| {
        let t = bc(5701);
        let other = bc(5702);
        let _g = t.enter();
        let h = beancounter::thread::spawn(move || {
            let start = (current_id(), fork_id());
            // The child's own guards work as anywhere else.
            let inner = {
                let _g = other.enter_exec();
                (current_id(), fork_id())
            };
            (start, inner, current_id())
        })
        .unwrap();
        let (start, inner, end) = h.join().unwrap();
        assert_eq!(start, (BcId(5701), BcId(5701)));
        assert_eq!(inner, (BcId(5702), BcId(5701)));
        assert_eq!(end, BcId(5701));
        // From the root, children start in the root.
        drop(_g);
        assert_eq!(fork_id(), BcId::ROOT);
    });
}

#[test]
fn spawned_thread_is_charged_while_it_runs() {
    let parent = bc(5801);
    let t = parent.new_child(BcId(5802)).unwrap();
    let (go, wait) = mpsc::channel::<()>();
    let h = {
        let _g = t.enter();
        beancounter::thread::spawn(move || wait.recv().unwrap()).unwrap()
    };
    assert_eq!(threads_held(&t), 1);
    assert_eq!(threads_held(&parent), 1, "the ancestor is not charged");
    go.send(()).unwrap();
    h.join().unwrap();
    assert_eq!((threads_held(&t), threads_held(&parent)), (0, 0));
    assert_eq!(t.stat(Resource::Threads).maxheld, 1);
    // The thread's context gave its references back on exit.
    drop((t, parent));
    assert!(!exists(5802) && !exists(5801));
}

#[test]
fn panicking_spawned_thread_is_uncharged() {
    let t = bc(5901);
    let (go, wait) = mpsc::channel::<()>();
    let h = {
        let _g = t.enter();
        beancounter::thread::spawn(move || {
            wait.recv().unwrap();
            panic!("the child fails on purpose");
        })
        .unwrap()
    };
    assert_eq!(threads_held(&t), 1);
    go.send(()).unwrap();
    assert!(h.join().is_err());
    assert_eq!(threads_held(&t), 0);
    assert_eq!(t.uncharge_warnings(Resource::Threads), 0);
    drop(t);
    assert!(!exists(5901), "a panicking thread leaked a reference");
}

#[test]
fn threads_limit_refusal_is_quota_exceeded() {
    let t = bc(6001);
    t.set_limits(Resource::Threads, Limits::new(1, 1).unwrap())
        .unwrap();
    let _g = t.enter();
    let (go, wait) = mpsc::channel::<()>();
    let first = beancounter::thread::spawn(move || wait.recv().unwrap()).unwrap();
    let before = t.stat(Resource::Threads);
    assert_eq!(before.held, 1);

    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let err = beancounter::thread::spawn(move || flag.store(true, Ordering::SeqCst))
        .expect_err("spawned past the Threads limit");
    assert_eq!(err.kind(), io::ErrorKind::QuotaExceeded);
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<BcError>())
        .expect("the error carries the BcError");
    match inner {
        BcError::Exceeded(e) => {
            assert_eq!((e.id, e.resource), (BcId(6001), Resource::Threads));
            assert_eq!((e.requested, e.held, e.bound), (1, 1, 1));
            assert_eq!(e.severity, Severity::Limit);
        }
        other => panic!("{other:?}"),
    }
    // The builder refuses the same way.
    let err = beancounter::thread::Builder::new()
        .name("refused".into())
        .spawn(|| ())
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::QuotaExceeded);

    let after = t.stat(Resource::Threads);
    assert_eq!(after.held, before.held, "a refused spawn changed held");
    assert_eq!(after.failcnt, before.failcnt + 2);
    go.send(()).unwrap();
    first.join().unwrap();
    assert!(!ran.load(Ordering::SeqCst), "the refused closure ran");
    assert_eq!(threads_held(&t), 0);
    // With room again, spawning works.
    beancounter::thread::spawn(|| ()).unwrap().join().unwrap();
}

#[test]
fn builder_name_and_stack_size() {
    let t = bc(6101);
    let _g = t.enter();
    const STACK: usize = 8 << 20;
    let h = beancounter::thread::Builder::new()
        .name("bc-worker".to_string())
        .stack_size(STACK)
        .spawn(|| {
            let name = std::thread::current().name().map(str::to_owned);
            (name, current_id(), stack_size())
        })
        .unwrap();
    assert_eq!(h.thread().name(), Some("bc-worker"));
    let (name, id, stack) = h.join().unwrap();
    assert_eq!(name.as_deref(), Some("bc-worker"));
    assert_eq!(id, BcId(6101));
    if let Some(stack) = stack {
        assert!(stack >= STACK, "stack of {stack} bytes, asked for {STACK}");
    }
    // Default builder works and matches `spawn`.
    let h = beancounter::thread::Builder::default()
        .spawn(current_id)
        .unwrap();
    assert_eq!(h.join().unwrap(), BcId(6101));
    assert_eq!(threads_held(&t), 0);
}

/// This thread's stack size as the OS reports it (Linux with glibc only).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn stack_size() -> Option<usize> {
    let mut size = 0usize;
    // SAFETY: `attr` is initialised by pthread_getattr_np before it is read, and destroyed
    // exactly once after; `size` is a valid out-pointer.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let ok = libc::pthread_attr_getstacksize(&attr, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        ok.then_some(size)
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn stack_size() -> Option<usize> {
    None
}

/// What a thread-local's destructor saw of the context during thread exit: the id, plus
/// whether entering a beancounter from there took effect.
static SEEN_AT_EXIT: AtomicU32 = AtomicU32::new(u32::MAX);
static ENTERED_AT_EXIT: AtomicU32 = AtomicU32::new(u32::MAX);

struct ExitProbe {
    enter: Option<Beancounter>,
    seen: &'static AtomicU32,
    entered: &'static AtomicU32,
}

impl Drop for ExitProbe {
    fn drop(&mut self) {
        self.seen.store(current_id().0, Ordering::SeqCst);
        let _ = beancounter::current().stat(Resource::Memory);
        if let Some(b) = self.enter.take() {
            let g = b.enter();
            self.entered.store(current_id().0, Ordering::SeqCst);
            drop(g);
        }
    }
}

#[test]
fn thread_locals_can_use_the_context_during_thread_exit() {
    use std::cell::RefCell;
    thread_local! {
        static PROBE: RefCell<Option<ExitProbe>> = const { RefCell::new(None) };
    }
    static SEEN_EARLY: AtomicU32 = AtomicU32::new(u32::MAX);
    static ENTERED_EARLY: AtomicU32 = AtomicU32::new(u32::MAX);

    // Probe registered after the context's exit hook (spawned child: the hook is armed
    // before the closure runs), so its destructor runs while the context may still be set.
    let t = bc(6201);
    let other = bc(6202);
    let h = {
        let _g = t.enter();
        let other = other.clone();
        beancounter::thread::spawn(move || {
            PROBE.with(|p| {
                *p.borrow_mut() = Some(ExitProbe {
                    enter: Some(other),
                    seen: &SEEN_AT_EXIT,
                    entered: &ENTERED_AT_EXIT,
                })
            });
        })
        .unwrap()
    };
    h.join().unwrap();
    let seen = SEEN_AT_EXIT.load(Ordering::SeqCst);
    assert!(seen == 0 || seen == 6201, "saw {seen} during thread exit");
    assert_eq!(ENTERED_AT_EXIT.load(Ordering::SeqCst), 6202);

    // Probe registered before the context's exit hook (the thread adopts a tenant only
    // afterwards), so its destructor runs after the hook released the context.
    let adopted = bc(6203);
    let entered = bc(6204);
    let (a2, e2) = (adopted.clone(), entered.clone());
    std::thread::spawn(move || {
        PROBE.with(|p| {
            *p.borrow_mut() = Some(ExitProbe {
                enter: Some(e2),
                seen: &SEEN_EARLY,
                entered: &ENTERED_EARLY,
            })
        });
        a2.adopt();
        drop(a2);
        assert_eq!(current_id(), BcId(6203));
    })
    .join()
    .unwrap();
    let seen = SEEN_EARLY.load(Ordering::SeqCst);
    assert!(seen == 0 || seen == 6203, "saw {seen} during thread exit");
    assert_eq!(ENTERED_EARLY.load(Ordering::SeqCst), 6204);

    // Every reference taken during teardown was given back.
    drop((t, other, adopted, entered));
    for id in [6201, 6202, 6203, 6204] {
        assert!(
            !exists(id),
            "beancounter {id} kept alive by a finished thread"
        );
    }
}
