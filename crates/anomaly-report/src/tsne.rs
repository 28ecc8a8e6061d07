//! Exact t-SNE (van der Maaten & Hinton, 2008), with scikit-learn's optimiser settings, so that a report can
//! show how test images sit among the training images. Exact rather than Barnes-Hut: a report embeds at most
//! a few thousand images, where the O(n²) gradient takes seconds and needs no approximation to explain.
//! Every sum runs in a fixed order, so a seed gives the same embedding on any number of threads.

use anomaly_data::SplitMix;
use rayon::prelude::*;

/// t-SNE settings; the defaults are scikit-learn's.
#[derive(Clone, Debug, PartialEq)]
pub struct TsneConfig {
    /// Effective number of neighbours each point attends to (clamped below `(n - 1) / 3`).
    pub perplexity: f64,
    /// Gradient steps in all.
    pub iterations: usize,
    /// Steps with the attractive forces exaggerated, which lets clusters form before they settle.
    pub exaggeration_iterations: usize,
    pub exaggeration: f64,
    /// Seed of the random initial layout.
    pub seed: u64,
}

impl Default for TsneConfig {
    fn default() -> Self {
        Self { perplexity: 30.0, iterations: 1000, exaggeration_iterations: 250, exaggeration: 12.0, seed: 0 }
    }
}

/// Embeds `rows` points of `dim` values (row-major) in the plane; returns `[x, y]` per point.
pub fn tsne(points: &[f32], dim: usize, config: &TsneConfig) -> Vec<[f64; 2]> {
    assert!(dim > 0 && points.len().is_multiple_of(dim), "points must be rows of {dim} values");
    let n = points.len() / dim;
    if n < 2 {
        return vec![[0.0, 0.0]; n];
    }
    let p = joint_probabilities(points, dim, config.perplexity.min((n as f64 - 1.0) / 3.0).max(1.0));
    let mut rng = SplitMix(config.seed);
    let mut y: Vec<[f64; 2]> = (0..n).map(|_| [1e-4 * normal(&mut rng), 1e-4 * normal(&mut rng)]).collect();
    let mut update = vec![[0.0f64; 2]; n];
    let mut gains = vec![[1.0f64; 2]; n];
    let learning_rate = (n as f64 / config.exaggeration / 4.0).max(50.0);
    for iteration in 0..config.iterations {
        let exaggerated = iteration < config.exaggeration_iterations;
        let (exaggeration, momentum) = if exaggerated { (config.exaggeration, 0.5) } else { (1.0, 0.8) };
        let gradient = gradient(&p, &y, exaggeration);
        for i in 0..n {
            for a in 0..2 {
                // As scikit-learn: grow the gain where the step reverses direction, else shrink it.
                let reversing = update[i][a] * gradient[i][a] < 0.0;
                gains[i][a] = if reversing { gains[i][a] + 0.2 } else { (gains[i][a] * 0.8).max(0.01) };
                update[i][a] = momentum * update[i][a] - learning_rate * gains[i][a] * gradient[i][a];
                y[i][a] += update[i][a];
            }
        }
    }
    y
}

/// Symmetric affinities P (row-major n × n): per point, a Gaussian whose width gives the wanted perplexity.
fn joint_probabilities(points: &[f32], dim: usize, perplexity: f64) -> Vec<f64> {
    let n = points.len() / dim;
    let target_entropy = perplexity.ln();
    let rows: Vec<&[f32]> = points.chunks_exact(dim).collect();
    let mut conditional = vec![0.0f64; n * n];
    conditional.par_chunks_mut(n).enumerate().for_each(|(i, out)| {
        let distances: Vec<f64> =
            rows.iter().map(|other| rows[i].iter().zip(*other).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum()).collect();
        // Binary search over the precision beta = 1 / (2σ²), as scikit-learn's _binary_search_perplexity.
        let (mut beta, mut low, mut high) = (1.0f64, 0.0f64, f64::INFINITY);
        for _ in 0..100 {
            let mut sum = 0.0;
            for (j, &d) in distances.iter().enumerate() {
                out[j] = if j == i { 0.0 } else { (-d * beta).exp() };
                sum += out[j];
            }
            let sum = sum.max(1e-300);
            let mut weighted = 0.0;
            for (o, &d) in out.iter_mut().zip(&distances) {
                *o /= sum;
                weighted += d * *o;
            }
            let entropy = sum.ln() + beta * weighted;
            let error = entropy - target_entropy;
            if error.abs() <= 1e-5 {
                break;
            }
            if error > 0.0 {
                low = beta;
                beta = if high.is_infinite() { beta * 2.0 } else { (beta + high) / 2.0 };
            } else {
                high = beta;
                beta = (beta + low) / 2.0;
            }
        }
    });
    let mut joint = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            joint[i * n + j] = ((conditional[i * n + j] + conditional[j * n + i]) / (2.0 * n as f64)).max(1e-12);
        }
    }
    joint
}

/// The gradient of KL(P || Q) with respect to each point's position.
fn gradient(p: &[f64], y: &[[f64; 2]], exaggeration: f64) -> Vec<[f64; 2]> {
    let n = y.len();
    let kernel = |i: usize, j: usize| 1.0 / (1.0 + (y[i][0] - y[j][0]).powi(2) + (y[i][1] - y[j][1]).powi(2));
    let row_sums: Vec<f64> = (0..n).into_par_iter().map(|i| (0..n).filter(|&j| j != i).map(|j| kernel(i, j)).sum()).collect();
    let z: f64 = row_sums.iter().sum();
    (0..n)
        .into_par_iter()
        .map(|i| {
            let mut g = [0.0f64; 2];
            for j in (0..n).filter(|&j| j != i) {
                let q = kernel(i, j);
                let force = (exaggeration * p[i * n + j] - q / z) * q;
                g[0] += 4.0 * force * (y[i][0] - y[j][0]);
                g[1] += 4.0 * force * (y[i][1] - y[j][1]);
            }
            g
        })
        .collect()
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut SplitMix) -> f64 {
    (-2.0 * rng.uniform().ln()).sqrt() * (std::f64::consts::TAU * rng.uniform()).cos()
}
