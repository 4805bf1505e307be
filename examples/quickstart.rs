//! The README's quickstart, verbatim: install the allocator, give a tenant its bounds, run its
//! work under a guard, and print the `/proc/user_beancounters` table.

use beancounter::{BcId, BeanAlloc, Limits, Resource};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

fn main() -> Result<(), beancounter::BcError> {
    let tenant = beancounter::find_or_create(BcId(1))?;
    tenant.set_limits(Resource::Memory, Limits::new(16 << 20, 64 << 20)?)?;

    let _guard = tenant.enter(); // this thread now allocates for tenant 1
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20); // charged to tenant 1
    buf.extend_from_slice(b"hello");
    assert!(buf.try_reserve(1 << 30).is_err()); // past the limit: refused, not fatal
    let over_barrier = beancounter::fallible(|| buf.try_reserve(32 << 20));
    assert!(over_barrier.is_err()); // a fallible request is held to the barrier
    assert!(tenant.stat(Resource::Memory).held >= 1 << 20);
    print!("{}", beancounter::report::user_beancounters());
    Ok(())
}
