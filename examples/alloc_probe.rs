use rankfuse::adapter::{Lora, Scaling, TensorData};
use rankfuse::runtime::slot;
use rankfuse::{DType, LinearProblem, Matrix, Runtime};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
struct A;
static ON: AtomicBool = AtomicBool::new(false);
thread_local! { static IN: Cell<bool> = const { Cell::new(false) }; }
unsafe impl GlobalAlloc for A {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) && !IN.with(|i| i.get()) {
            IN.with(|i| i.set(true));
            eprintln!("ALLOC {} bytes\n{}", l.size(), std::backtrace::Backtrace::force_capture());
            IN.with(|i| i.set(false));
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) { System.dealloc(p, l) }
}
#[global_allocator]
static G: A = A;
fn main() {
    let rt = Runtime::cpu().unwrap();
    let v: Vec<usize> = std::env::var("P").unwrap().split(",").map(|s| s.parse().unwrap()).collect(); let (m, k, n, r) = (v[0], v[1], v[2], v[3]);
    let mk = |rows, cols| Matrix::from_f32(DType::BF16, rows, cols, &vec![0.01f32; rows * cols]).unwrap();
    let (x, w) = (mk(m, k), mk(n, k));
    let lora = Lora::new("p", TensorData::Owned(mk(r, k)), TensorData::Owned(mk(n, r)), 16.0, Scaling::Lora, 0.0).unwrap();
    let s = [Some(slot(&lora, 0, 1.0).unwrap())];
    let mut y = Matrix::zeros(DType::BF16, m, n).unwrap();
    let p = LinearProblem { x: x.view(), w: w.view(), bias: None, slots: &s, row_slot: None };
    for _ in 0..5 { rt.linear(&p, &mut y.view_mut()).unwrap(); }
    ON.store(true, Ordering::Relaxed);
    for _ in 0..5 { rt.linear(&p, &mut y.view_mut()).unwrap(); }
    ON.store(false, Ordering::Relaxed);
}
