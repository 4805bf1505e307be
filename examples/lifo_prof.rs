use std::alloc::{GlobalAlloc, Layout};
static BEAN: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
fn main() {
    let t = beancounter::find_or_create(beancounter::BcId(1)).unwrap();
    let _g = t.enter();
    let mut ptrs = Vec::with_capacity(1000);
    for _ in 0..20000 {
        for i in 0..1000usize {
            let l = Layout::from_size_align(16 + (i * 48) % 1009, 8).unwrap();
            let p = unsafe { BEAN.alloc(l) };
            unsafe { p.write(i as u8) };
            ptrs.push((p, l));
        }
        while let Some((p, l)) = ptrs.pop() {
            unsafe { BEAN.dealloc(std::hint::black_box(p), l) };
        }
    }
}
