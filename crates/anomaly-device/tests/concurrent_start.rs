//! The shared context started from many threads at once as the first thing a process does, while other
//! threads start burn's default device: every caller gets the one context, and both devices compute.
//! Its own test binary, so that nothing has started a device before.

use std::sync::Barrier;
use std::thread;

use anomaly_device::GpuContext;
use burn::tensor::{Device, Tensor};

#[test]
fn concurrent_first_starts_give_one_working_context() {
    const CALLERS: usize = 8;
    const DEFAULT_USERS: usize = 4;
    let start = Barrier::new(CALLERS + DEFAULT_USERS);
    let contexts: Vec<usize> = thread::scope(|scope| {
        for _ in 0..DEFAULT_USERS {
            scope.spawn(|| {
                start.wait();
                let t = Tensor::<1>::from_floats([1.0, 2.0], &Device::default());
                assert_eq!(t.sum().into_scalar::<f32>(), 3.0);
            });
        }
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    let context = GpuContext::get().unwrap_or_else(|e| panic!("{e}"));
                    std::ptr::from_ref(context) as usize
                })
            })
            .collect();
        callers.into_iter().map(|caller| caller.join().unwrap()).collect()
    });
    assert!(contexts.windows(2).all(|pair| pair[0] == pair[1]), "one context for all callers");

    let context = GpuContext::get().unwrap();
    let t = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &context.device);
    assert_eq!(t.clone().matmul(t).sum().into_scalar::<f32>(), 54.0);
}
