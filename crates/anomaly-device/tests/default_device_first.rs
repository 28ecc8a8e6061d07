//! The flaky start of issue 9, made deterministic: burn creates its wgpu `DefaultDevice` runtime lazily the
//! first time a tensor is made on `Device::default()` — burn-optim's `ModuleOptimizer::load` does exactly
//! that, and the autoencoder's resume test ran it on another test thread before the first wgpu test — and
//! the shared context, registered under that same name, then failed with "Service already initialized".
//! Its own test binary, so that the default device really is started before anything else.

use anomaly_device::GpuContext;
use burn::tensor::{Device, Tensor};

#[test]
fn the_context_starts_after_burn_has_started_its_default_device() {
    let early = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &Device::default());
    assert_eq!(early.sum().into_scalar::<f32>(), 6.0);

    let context = GpuContext::get().expect("the shared context starts under an identity of its own");
    assert_ne!(context.device, Device::default(), "not burn's default device");
    let on_context = Tensor::<1>::from_floats([4.0, 5.0], &context.device);
    assert_eq!(on_context.sum().into_scalar::<f32>(), 9.0);
}
