//! Inference-time folding of BatchNorm into the convolution before it: `γ (conv(x) − μ) / √(σ² + ε) + β`
//! is the convolution with per-output-channel scaled weights plus a bias. burn applies a BatchNorm as four
//! broadcast passes over the activation (subtract, divide, multiply, add); folded, the pair costs the
//! convolution and one bias add.

use burn::module::Param;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

/// Folds `norm` into `conv` and removes it (a no-op when it is already folded).
pub(crate) fn fold_batch_norm(conv: &mut Conv2d, norm: &mut Option<BatchNorm>) {
    let Some(bn) = norm.take() else { return };
    let scale = bn.gamma.val().div(bn.running_var.value().add_scalar(bn.epsilon).sqrt());
    let shift = bn.beta.val() - bn.running_mean.value().mul(scale.clone());
    let bias = match conv.bias.take() {
        Some(bias) => bias.val().mul(scale.clone()) + shift,
        None => shift,
    };
    let [out_channels, ..] = conv.weight.dims();
    let weight = conv.weight.val().mul(scale.reshape([out_channels, 1, 1, 1]));
    conv.weight = Param::from_tensor(weight);
    conv.bias = Some(Param::from_tensor(bias));
}

/// The BatchNorm, if it has not been folded away.
pub(crate) fn normalise(norm: &Option<BatchNorm>, x: Tensor<4>) -> Tensor<4> {
    match norm {
        Some(bn) => bn.forward(x),
        None => x,
    }
}
