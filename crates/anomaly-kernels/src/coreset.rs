//! PatchCore's approximate greedy coreset (Roth et al. 2022, `ApproximateGreedyCoresetSampler`): the
//! selection space every path shares, and the host side of `shaders/coreset.wgsl`.
//!
//! The definition, shared by the CPU reference (`cpu::reference::coreset`), the multithreaded CPU path
//! (`cpu::fast::coreset`) and the GPU (`GpuKernels::coreset`):
//! 1. **RNG**: SplitMix64 seeded with `seed`. Its first output `u` gives the start index
//!    `(u × N) >> 64`. The next outputs fill the projection matrix W (`D × P`, row-major) in pairs by
//!    Box–Muller in f64: `u1 = ((a >> 11) + 1) · 2⁻⁵³` (in (0, 1]), `u2 = (b >> 11) · 2⁻⁵³`,
//!    `r = √(−2 ln u1)`, entries `r cos 2πu2` then `r sin 2πu2`, each divided by `√P` and rounded to f32.
//! 2. **Projection** (skipped when `projection` is 0 or ≥ D): `y[i][p] = Σ_k x[i][k] · W[k][p]` in f32,
//!    summed over k = 0, 1, … with a multiply then an add, on the CPU.
//! 3. **Grid**: every projected value becomes the integer `round(y / s)` with `s = max |y| / 127`, so all
//!    coordinates lie in −127 … 127 (stored as i8). Differences then lie within ±254 and their squares
//!    below 2¹⁶: each is exact in f32, and so is every partial sum of up to 260 of them (below 2²⁴), so at
//!    PatchCore's 128 projected dimensions every squared distance is an exact integer. Wider spaces (no
//!    projection) sum over dimensions in the order j = 0, 1, … in f32, and a fused multiply-add rounds
//!    `sum + t²` exactly as a multiply then an add does: a squared distance is the same f32 on every path,
//!    whether or not a GPU compiler fuses (Vulkan allows it, and hardware GPUs do). The grid's step is
//!    1/254 of the value range, below the random projection's own distortion: on MVTec AD bottle (Lite0,
//!    10% coreset) the 8-bit grid gave image AUROC 1.0000, pixel AUROC 0.9807 and AUPRO 0.9328 against
//!    1.0000, 0.9806 and 0.9325 for a 12-bit one, at a quarter of the f32 projection's memory.
//! 4. **Greedy**: picks start with the start index; each step marks the last pick (running minimum −1, so
//!    it is never picked again), lowers every point's running minimum squared distance to the picked set
//!    by its distance to the last pick, and picks the point of largest running minimum, ties to the lower
//!    index, until `ceil(ratio × N)` picks (at least 1). `ratio = 1` returns every point, in pick order.
//!
//! The matrix uses libm's `ln`, `cos` and `sin` in f64, so it may differ in the last bit between
//! platforms; on one machine every path selects from the same bits.
//!
//! How the paths get there differs. The reference and the GPU measure every point at every step. The
//! multithreaded CPU path (`cpu/coreset_cells.rs`) prunes by the triangle inequality: each point stays in
//! the cell of the pick that set its minimum, and a new pick skips every cell, and every block of 8 points, it
//! provably cannot bring nearer (the test runs in f64 with a margin above the f32 sums' rounding, so it
//! never skips a point whose minimum would change); the points it measures are summed in the order above,
//! and the arg-max follows the same (value, then lower index) order, so its picks are the same bits. As
//! the coreset grows the minima shrink and a step measures a small share of the points (about 2% over a
//! whole coreset of 10% of 164k clustered points). Where it measures most points anyway, as on
//! structureless noise, it finishes as a plain scan of every point from the minima it has.

use burn::tensor::wgpu::wgpu;
use bytemuck::{Pod, Zeroable};
use rayon::prelude::*;
use wgpu::util::{BufferInitDescriptor, DeviceExt};

use crate::context::{GpuKernels, Kernel, KernelError, Slot, shader_module};
use crate::distance::DistanceKernel;
use crate::distance_subgroup::fixed_subgroup_size;

/// The largest grid coordinate: coordinates fit in i8, squared differences (up to 254²) are exact in f32.
pub const GRID_MAX: f32 = 127.0;

/// Invocations per workgroup of the three entry points (the shader's `WG`).
const WG: u32 = 256;
const _: () = assert!(WG.is_power_of_two(), "the shader halves the workgroup in its arg-max");

/// Quads (4-point words) per block of a chunk's points on the device (the shader's `BLOCK`): 32 points,
/// four of the space's blocks interleaved, so that the invocations of a block read adjacent words
/// (coalesced on hardware GPUs) and a block is one contiguous run over the dimensions (4 KiB at 128:
/// llvmpipe's SIMD groups then read page-long streams the CPU's prefetcher follows).
const BLOCK_QUADS: usize = 8;
/// Points per block on the device.
const BLOCK_POINTS: usize = 4 * BLOCK_QUADS;
/// Points an invocation of the step sums: four words, read as one vec4<u32> a dimension. On llvmpipe,
/// which reads storage in a loop over the SIMD lanes, one such loop per 16 points rather than per 4 cut
/// the step at 1M × 128 from 7.2–8.3 s to 3.7–4.6 s (100 steps), against 13.6–17.9 s for f32 points
/// read column by column.
const INVOCATION_POINTS: usize = 16;
const _: () = assert!(BLOCK_POINTS.is_multiple_of(SPACE_GROUP), "a device block interleaves whole blocks of the space");
const _: () = assert!(BLOCK_POINTS.is_multiple_of(INVOCATION_POINTS), "an invocation reads whole words of one block");

/// Greedy steps encoded per submission (the picks are read back after each): the default of
/// [`CoresetChunking::steps_per_submission`].
pub const STEPS_PER_SUBMISSION: usize = 4096;

/// How PatchCore's coreset is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CoresetSettings {
    /// Share of the points kept, in (0, 1]: `ceil(ratio × N)` picks, at least 1; 1 keeps every point,
    /// in pick order.
    pub ratio: f64,
    /// Dimensions of the random projection; 0 (or ≥ the feature width) keeps the features as they are.
    pub projection: usize,
    /// Seed of the start index and the projection.
    pub seed: u64,
}

impl Default for CoresetSettings {
    /// PatchCore's defaults: 10% of the points, 128 projected dimensions.
    fn default() -> Self {
        Self { ratio: 0.1, projection: 128, seed: 0 }
    }
}

impl CoresetSettings {
    /// Points a coreset of `rows` points keeps (what memory plans size the bank by).
    pub fn picks(&self, rows: usize) -> usize {
        pick_count(self.ratio, rows)
    }

    /// Width of the space the selection runs in, for features `dims` wide.
    pub fn space_dims(&self, dims: usize) -> usize {
        if self.projection == 0 || self.projection >= dims { dims } else { self.projection }
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): the generator of the start index and the projection.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Two independent standard normal values (Box–Muller).
    fn normal_pair(&mut self) -> (f64, f64) {
        const STEP: f64 = 1.0 / (1u64 << 53) as f64;
        let u1 = ((self.next_u64() >> 11) + 1) as f64 * STEP;
        let u2 = (self.next_u64() >> 11) as f64 * STEP;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        (r * theta.cos(), r * theta.sin())
    }
}

/// What the settings make of a feature matrix before any projection: checked shapes, the start index,
/// the number of picks and the projection matrix. Shared by every path: it is the definition.
pub(crate) struct Plan {
    pub start: usize,
    pub picks: usize,
    /// Width of the selection space.
    pub dims: usize,
    /// `features dims × dims`, row-major; `None`: no projection.
    pub matrix: Option<Vec<f32>>,
}

impl Plan {
    pub fn new(features: &[f32], rows: usize, dims: usize, settings: &CoresetSettings) -> Result<Self, KernelError> {
        check_len(features, rows, dims)?;
        let plan = Self::for_shape(rows, dims, settings)?;
        if let Some(position) = features.iter().position(|x| !x.is_finite()) {
            return Err(KernelError::NonFinite { row: position / dims, column: position % dims });
        }
        Ok(plan)
    }

    /// The plan for `rows × dims` features not yet seen (they arrive in chunks): the shape and
    /// settings checked, the features' values left to the caller.
    pub fn for_shape(rows: usize, dims: usize, settings: &CoresetSettings) -> Result<Self, KernelError> {
        if rows == 0 || dims == 0 {
            return Err(KernelError::Shape(format!("a coreset needs at least one point of at least one dimension: {rows} × {dims}")));
        }
        if rows > u32::MAX as usize {
            return Err(KernelError::Shape(format!("{rows} points are more than a coreset indexes (at most {})", u32::MAX)));
        }
        if !(settings.ratio > 0.0 && settings.ratio <= 1.0) {
            return Err(KernelError::InvalidRatio(settings.ratio));
        }
        let mut rng = SplitMix64::new(settings.seed);
        let start = ((rng.next_u64() as u128 * rows as u128) >> 64) as usize;
        let picks = pick_count(settings.ratio, rows);
        let projected = settings.projection;
        if projected == 0 || projected >= dims {
            return Ok(Self { start, picks, dims, matrix: None });
        }
        let scale = (projected as f64).sqrt();
        let mut matrix = Vec::with_capacity(dims * projected + 1);
        while matrix.len() < dims * projected {
            let (a, b) = rng.normal_pair();
            matrix.push((a / scale) as f32);
            matrix.push((b / scale) as f32);
        }
        matrix.truncate(dims * projected);
        Ok(Self { start, picks, dims: projected, matrix: Some(matrix) })
    }
}

/// Whether `features` holds `rows × dims` values, of at least one point of at least one dimension.
fn check_len(features: &[f32], rows: usize, dims: usize) -> Result<(), KernelError> {
    if rows == 0 || dims == 0 || rows.checked_mul(dims) != Some(features.len()) {
        return Err(KernelError::Shape(format!(
            "a coreset needs at least one point of at least one dimension: {rows} × {dims} features with {} values",
            features.len()
        )));
    }
    Ok(())
}

/// `ceil(ratio × rows)`, at least 1, with a product within 1e-9 (relative) of a whole number taken as that
/// number: 0.07 × 100 is 7.000000000000001 in f64, and must keep 7 points, not 8.
pub(crate) fn pick_count(ratio: f64, rows: usize) -> usize {
    let exact = ratio * rows as f64;
    let nearest = exact.round();
    let count = if (exact - nearest).abs() <= 1e-9 * nearest.max(1.0) { nearest } else { exact.ceil() };
    (count as usize).clamp(1, rows)
}

/// The grid step of values whose largest magnitude is `max_abs` (1 for all zeros).
pub(crate) fn grid_scale(max_abs: f32) -> Result<f32, KernelError> {
    if !max_abs.is_finite() {
        return Err(KernelError::Shape("the projected features overflow f32".into()));
    }
    Ok(if max_abs > 0.0 { max_abs / GRID_MAX } else { 1.0 })
}

/// A value on the grid of step `scale`.
pub(crate) fn to_grid(value: f32, scale: f32) -> f32 {
    (value / scale).round().clamp(-GRID_MAX, GRID_MAX)
}

/// The points the greedy selection runs on (projected and on the grid), with the start and the number
/// of picks: built once, so that timing a path or comparing paths selects from the very same bits.
/// Its fields are private, so every path may rely on their consistency.
///
/// The grid's integers are stored as i8, in blocks of [`SPACE_GROUP`] points dimension by dimension
/// (`blocks[(i / G · dims + j) · G + i % G]` holds coordinate j of point i): a quarter of the f32
/// projection's memory, and the layout the CPU selection's cells sum `G` distances side by side in, so
/// that it takes the space over as its first cell without a copy.
#[derive(Clone, Debug, PartialEq)]
pub struct CoresetSpace {
    rows: usize,
    dims: usize,
    blocks: Vec<i8>,
    start: usize,
    picks: usize,
}

/// Points per block of a [`CoresetSpace`] (and of the CPU selection's cells).
pub(crate) const SPACE_GROUP: usize = 8;

/// Where coordinate `j` of point `i` lies in blocks of [`SPACE_GROUP`] points laid out dimension by
/// dimension, `dims` wide: the layout of a [`CoresetSpace`] and of the CPU selection's cells.
pub(crate) fn space_index(i: usize, j: usize, dims: usize) -> usize {
    (i / SPACE_GROUP * dims + j) * SPACE_GROUP + i % SPACE_GROUP
}

impl CoresetSpace {
    /// Projects (on all cores) and grids `rows × dims` row-major features.
    pub fn new(features: &[f32], rows: usize, dims: usize, settings: &CoresetSettings) -> Result<Self, KernelError> {
        check_len(features, rows, dims)?;
        Self::from_chunks(rows, dims, settings, || std::iter::once(features))
    }

    /// [`Self::new`] on features handed over in consecutive chunks of whole rows (a spill file read a
    /// chunk at a time): the same space. `chunks` is called twice: the first pass finds the grid's scale
    /// (the largest projected magnitude), the second projects again and stores the grid's integers, so
    /// that no f32 copy of the projection is ever held.
    pub fn from_chunks<'a, I: IntoIterator<Item = &'a [f32]>>(
        rows: usize,
        dims: usize,
        settings: &CoresetSettings,
        chunks: impl Fn() -> I,
    ) -> Result<Self, KernelError> {
        let plan = Plan::for_shape(rows, dims, settings)?;
        let p = plan.dims;
        let project = |row: &[f32], out: &mut Vec<f32>| match &plan.matrix {
            None => out.copy_from_slice(row),
            Some(matrix) => {
                out.fill(0.0);
                project_row(row, matrix, out);
            }
        };
        let mut max_abs = 0f32;
        let mut seen = 0;
        for chunk in chunks() {
            if !chunk.len().is_multiple_of(dims) || seen + chunk.len() / dims > rows {
                return Err(KernelError::Shape(format!(
                    "a chunk of {} values after {seen} rows is not rows of {rows} × {dims}",
                    chunk.len()
                )));
            }
            if let Some(position) = chunk.par_iter().position_first(|x| !x.is_finite()) {
                return Err(KernelError::NonFinite { row: seen + position / dims, column: position % dims });
            }
            let chunk_max = chunk
                .par_chunks(dims)
                .map_init(
                    || vec![0f32; p],
                    |out, row| {
                        project(row, out);
                        out.iter().fold(0f32, |m, y| m.max(y.abs()))
                    },
                )
                .reduce(|| 0.0, f32::max);
            max_abs = max_abs.max(chunk_max);
            seen += chunk.len() / dims;
        }
        if seen != rows {
            return Err(KernelError::Shape(format!("the chunks held {seen} of the {rows} rows")));
        }
        let scale = grid_scale(max_abs)?;
        let group = SPACE_GROUP;
        let mut blocks = vec![0i8; rows.div_ceil(group) * p * group];
        let mut first = 0;
        for chunk in chunks() {
            let count = chunk.len() / dims;
            if first + count > rows {
                return Err(KernelError::Shape("the chunks changed between the two passes".into()));
            }
            // Blocks this chunk writes into; the first and last may be shared with the chunks beside it.
            let (first_block, end_block) = (first / group, (first + count).div_ceil(group));
            blocks[first_block * p * group..end_block * p * group].par_chunks_mut(p * group).enumerate().for_each_init(
                || vec![0f32; p],
                |out, (b, block)| {
                    let base = (first_block + b) * group;
                    for i in base.max(first)..(base + group).min(first + count) {
                        project(&chunk[(i - first) * dims..][..dims], out);
                        for (j, &y) in out.iter().enumerate() {
                            block[space_index(i - base, j, p)] = to_grid(y, scale) as i8;
                        }
                    }
                },
            );
            first += count;
        }
        if first != rows {
            return Err(KernelError::Shape("the chunks changed between the two passes".into()));
        }
        Ok(Self { rows, dims: p, blocks, start: plan.start, picks: plan.picks })
    }

    /// Coordinate `j` of point `i`, a grid integer.
    pub fn value(&self, i: usize, j: usize) -> f32 {
        self.blocks[space_index(i, j, self.dims)] as f32
    }

    /// Point `i` (`i` < `rows()`).
    pub fn row(&self, i: usize) -> Vec<f32> {
        (0..self.dims).map(|j| self.value(i, j)).collect()
    }

    /// Every point, row-major f32 (for the reference and tests: four times the space's own memory).
    pub fn to_rows(&self) -> Vec<f32> {
        (0..self.rows).flat_map(|i| self.row(i)).collect()
    }

    /// Points (N).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Dimensions after the projection (P).
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The seeded first pick.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Points to pick, the start included.
    pub fn picks(&self) -> usize {
        self.picks
    }

    /// Picks `picks` points instead (kept within 1 … N): a benchmark times part of a run with it; every
    /// run's picks are a prefix of the whole coreset's.
    pub fn set_picks(&mut self, picks: usize) {
        self.picks = picks.clamp(1, self.rows);
    }

    /// The blocks of points, given over to the CPU selection's first cell.
    pub(crate) fn into_blocks(self) -> Vec<i8> {
        self.blocks
    }
}

/// `out = row · W`, summed over the rows of W in order (the reference writes the same loop out).
fn project_row(row: &[f32], matrix: &[f32], out: &mut [f32]) {
    for (&x, w) in row.iter().zip(matrix.chunks_exact(out.len())) {
        for (o, &w) in out.iter_mut().zip(w) {
            *o += x * w;
        }
    }
}

/// How the GPU path splits its work; tests lower both to exercise chunking and several submissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoresetChunking {
    /// Most points per chunk (one binding each), rounded down to whole device blocks of 32 points (at
    /// least one); `None`: as many as the device's binding limit allows.
    pub chunk_rows: Option<usize>,
    /// Greedy steps per submission, after each of which the picks are read back.
    pub steps_per_submission: usize,
}

impl Default for CoresetChunking {
    fn default() -> Self {
        Self { chunk_rows: None, steps_per_submission: STEPS_PER_SUBMISSION }
    }
}

/// The shader's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    rows: u32,
    start: u32,
    dims: u32,
    partial_offset: u32,
    partials: u32,
    block: u32,
    _pad0: u32,
    _pad1: u32,
}

/// The three entry points of `coreset.wgsl`, on one binding layout, and `coreset_subgroup.wgsl`'s
/// `update` where the device can run it.
pub(crate) struct CoresetKernels {
    fetch: Kernel,
    update: Kernel,
    /// `None` where the device lacks subgroups of a fixed size the shader is written for.
    update_subgroup: Option<Kernel>,
    reduce: Kernel,
}

/// The bindings every entry point shares.
const SLOTS: [Slot; 7] = [Slot::Uniform, Slot::Read, Slot::Write, Slot::Write, Slot::Write, Slot::Write, Slot::Write];

impl CoresetKernels {
    pub fn new(device: &wgpu::Device) -> Self {
        let module = shader_module(device, "coreset", include_str!("../../../shaders/coreset.wgsl"));
        let constants = [("WG", WG as f64), ("BLOCK", BLOCK_QUADS as f64)];
        let update_subgroup = fixed_subgroup_size(device).map(|size| {
            // WGSL has no includes: the subgroup entry point is appended to the module it shares its
            // bindings and helpers with, which only devices with subgroups compile.
            let source = concat!(include_str!("../../../shaders/coreset.wgsl"), include_str!("../../../shaders/coreset_subgroup.wgsl"));
            let module = shader_module(device, "coreset_subgroup", source);
            Kernel::new(
                device,
                &module,
                "update_subgroup",
                &SLOTS,
                &[("WG", WG as f64), ("BLOCK", BLOCK_QUADS as f64), ("SG", size as f64)],
            )
        });
        Self {
            fetch: Kernel::new(device, &module, "fetch", &SLOTS, &constants),
            update: Kernel::new(device, &module, "update", &SLOTS, &constants),
            update_subgroup,
            reduce: Kernel::new(device, &module, "reduce", &SLOTS, &constants),
        }
    }
}

/// One chunk of points on the device with its bind groups (one per entry point, built once, used by
/// every step).
struct Chunk {
    groups: u32,
    fetch: wgpu::BindGroup,
    update: wgpu::BindGroup,
    reduce: wgpu::BindGroup,
}

/// Points `start` … `start + rows` of `space` (`start` on a device block) as the shader reads them:
/// blocks of [`BLOCK_POINTS`] points, each dimension by dimension, padded with zeros to whole blocks.
fn device_blocks(space: &CoresetSpace, start: usize, rows: usize) -> Vec<i8> {
    let p = space.dims;
    let mut values = vec![0i8; rows.next_multiple_of(BLOCK_POINTS) * p];
    values.par_chunks_mut(BLOCK_POINTS * p).enumerate().for_each(|(b, block)| {
        for s in 0..BLOCK_POINTS / SPACE_GROUP {
            let first = start + b * BLOCK_POINTS + s * SPACE_GROUP;
            if first >= start + rows {
                break;
            }
            // One of the space's blocks, dimension by dimension (its padding past the last point is zeros).
            for (j, word) in space.blocks[first * p..][..SPACE_GROUP * p].chunks_exact(SPACE_GROUP).enumerate() {
                block[j * BLOCK_POINTS + s * SPACE_GROUP..][..SPACE_GROUP].copy_from_slice(word);
            }
        }
    });
    values
}

impl GpuKernels {
    /// The coreset of `rows × dims` row-major features: PatchCore's greedy selection on the GPU, after
    /// the projection on the CPU. Returns the picked point indices, in pick order.
    pub fn coreset(&self, features: &[f32], rows: usize, dims: usize, settings: &CoresetSettings) -> Result<Vec<u32>, KernelError> {
        self.coreset_select(&CoresetSpace::new(features, rows, dims, settings)?, CoresetChunking::default())
    }

    /// The greedy selection on `space`: every step on the device, the picks read back once per
    /// `chunking.steps_per_submission` steps. Where the kNN runs the subgroup distance shader (software
    /// adapters), the steps share the centre across subgroups too (`coreset_subgroup.wgsl`).
    pub fn coreset_select(&self, space: &CoresetSpace, chunking: CoresetChunking) -> Result<Vec<u32>, KernelError> {
        let gpu = &self.gpu;
        let update = match (&self.coreset.update_subgroup, self.distance_kernel()) {
            (Some(kernel), DistanceKernel::Subgroup) => kernel,
            _ => &self.coreset.update,
        };
        let (n, p) = (space.rows, space.dims);
        let mut picks = vec![space.start as u32];
        if space.picks == 1 {
            return Ok(picks);
        }
        // Chunks of whole device blocks (a byte a coordinate), an invocation per 16 points.
        let block_bytes = (BLOCK_POINTS * p) as u64;
        let mut chunk_rows = ((gpu.limits.max_binding_bytes / block_bytes) as usize)
            .min(gpu.limits.max_workgroups as usize * WG as usize * INVOCATION_POINTS / BLOCK_POINTS)
            * BLOCK_POINTS;
        if let Some(rows) = chunking.chunk_rows {
            chunk_rows = chunk_rows.min((rows / BLOCK_POINTS).max(1) * BLOCK_POINTS);
        }
        if chunk_rows == 0 {
            return Err(KernelError::Shape(format!(
                "a block of {BLOCK_POINTS} coreset points of {p} dimensions ({block_bytes} bytes) is larger than the GPU's storage \
                 binding limit of {} bytes; use --device cpu",
                gpu.limits.max_binding_bytes
            )));
        }
        let steps = chunking.steps_per_submission.clamp(1, space.picks - 1);

        let starts: Vec<usize> = (0..n).step_by(chunk_rows).collect();
        let total_groups: usize = starts.iter().map(|&s| chunk_rows.min(n - s).div_ceil(INVOCATION_POINTS).div_ceil(WG as usize)).sum();
        if total_groups as u64 * 8 > gpu.limits.max_binding_bytes {
            return Err(KernelError::Shape(format!("{total_groups} workgroup results exceed one binding")));
        }
        let center = gpu.storage(p * 4, "coreset center");
        let partials = gpu.storage(total_groups * 8, "coreset partials");
        let state = gpu.device.create_buffer_init(&BufferInitDescriptor {
            label: Some("coreset state"),
            contents: bytemuck::cast_slice(&[space.start as u32, 0]),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let pick_list = gpu.storage(steps * 4, "coreset picks");
        let mut chunks = Vec::with_capacity(starts.len());
        let mut partial_offset = 0;
        for &start in &starts {
            let rows = chunk_rows.min(n - start);
            let padded = rows.next_multiple_of(BLOCK_POINTS);
            let data = gpu.device.create_buffer_init(&BufferInitDescriptor {
                label: Some("coreset points"),
                contents: bytemuck::cast_slice(&device_blocks(space, start, rows)),
                usage: wgpu::BufferUsages::STORAGE,
            });
            let mins = gpu.device.create_buffer_init(&BufferInitDescriptor {
                label: Some("coreset minima"),
                contents: bytemuck::cast_slice(&vec![f32::MAX; padded]),
                usage: wgpu::BufferUsages::STORAGE,
            });
            let groups = gpu.groups_1d(rows.div_ceil(INVOCATION_POINTS), WG)?.0;
            let params = gpu.uniform(&Params {
                rows: rows as u32,
                start: start as u32,
                dims: p as u32,
                partial_offset: partial_offset as u32,
                partials: total_groups as u32,
                block: steps as u32,
                _pad0: 0,
                _pad1: 0,
            });
            partial_offset += groups as usize;
            let buffers = [&params, &data, &center, &mins, &partials, &state, &pick_list];
            chunks.push(Chunk {
                groups,
                fetch: self.coreset.fetch.bind_group(&gpu.device, &buffers),
                update: update.bind_group(&gpu.device, &buffers),
                reduce: self.coreset.reduce.bind_group(&gpu.device, &buffers),
            });
        }

        while picks.len() < space.picks {
            let count = steps.min(space.picks - picks.len());
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                for _ in 0..count {
                    for chunk in &chunks {
                        gpu.dispatch_bound(&mut pass, &self.coreset.fetch, &chunk.fetch, (1, 1));
                    }
                    for chunk in &chunks {
                        gpu.dispatch_bound(&mut pass, update, &chunk.update, (chunk.groups, 1));
                    }
                    gpu.dispatch_bound(&mut pass, &self.coreset.reduce, &chunks[0].reduce, (1, 1));
                }
            }
            let parts = gpu.read_back(encoder, &[(&pick_list, (count * 4) as u64)])?;
            picks.extend_from_slice(bytemuck::cast_slice::<u8, u32>(&parts[0]));
        }
        Ok(picks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::assert_layout;

    #[test]
    fn params_match_the_shader() {
        assert_layout!(
            super::Params { rows, start, dims, partial_offset, partials, block, _pad0, _pad1 },
            include_str!("../../../shaders/coreset.wgsl"),
            32
        );
    }

    #[test]
    fn splitmix_matches_its_published_outputs() {
        // The first outputs of SplitMix64 seeded with 1234567 (the reference implementation's test vector).
        let mut rng = SplitMix64::new(1234567);
        let expected = [6457827717110365317u64, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821];
        for value in expected {
            assert_eq!(rng.next_u64(), value);
        }
    }

    #[test]
    fn the_plan_is_seeded_and_checked() {
        let features: Vec<f32> = (0..40 * 10).map(|i| (i % 17) as f32).collect();
        let settings = CoresetSettings { ratio: 0.1, projection: 4, seed: 3 };
        let a = Plan::new(&features, 40, 10, &settings).unwrap();
        let b = Plan::new(&features, 40, 10, &settings).unwrap();
        assert_eq!((a.start, a.picks, a.dims, &a.matrix), (b.start, b.picks, b.dims, &b.matrix));
        assert_eq!((a.picks, a.dims, a.matrix.as_ref().map(Vec::len)), (4, 4, Some(40)));
        let other = Plan::new(&features, 40, 10, &CoresetSettings { seed: 4, ..settings }).unwrap();
        assert_ne!(a.matrix, other.matrix, "the seed changes the projection");
        // The entries are N(0, 1/P): their mean square is near 1/4.
        let matrix = a.matrix.unwrap();
        let mean_square = matrix.iter().map(|&w| (w as f64).powi(2)).sum::<f64>() / matrix.len() as f64;
        assert!((0.1..0.45).contains(&mean_square), "{mean_square}");
        for projection in [0, 10, 11] {
            let plan = Plan::new(&features, 40, 10, &CoresetSettings { projection, ..settings }).unwrap();
            assert!(plan.matrix.is_none() && plan.dims == 10, "projection {projection} keeps the features");
        }
        assert_eq!(Plan::new(&features, 40, 10, &CoresetSettings { ratio: 1.0, ..settings }).unwrap().picks, 40);
        assert_eq!(Plan::new(&features, 40, 10, &CoresetSettings { ratio: 1e-9, ..settings }).unwrap().picks, 1);
        assert_eq!((0.07 * 100.0f64).ceil(), 8.0, "the rounding pick_count guards against");
        assert_eq!(pick_count(0.07, 100), 7);
        assert_eq!(pick_count(0.071, 100), 8);
        assert_eq!(pick_count(0.1, 1_000_001), 100_001);
        assert_eq!(pick_count(0.01, 1_000_000), 10_000);
        for ratio in [0.0, -0.5, 1.0000001, f64::NAN, f64::INFINITY] {
            assert!(
                matches!(Plan::new(&features, 40, 10, &CoresetSettings { ratio, ..settings }), Err(KernelError::InvalidRatio(_))),
                "{ratio}"
            );
        }
        assert!(matches!(Plan::new(&[], 0, 10, &settings), Err(KernelError::Shape(_))));
        assert!(matches!(Plan::new(&[], 10, 0, &settings), Err(KernelError::Shape(_))));
        assert!(matches!(Plan::new(&features, 41, 10, &settings), Err(KernelError::Shape(_))));
        let mut bad = features.clone();
        bad[23] = f32::NAN;
        assert!(matches!(Plan::new(&bad, 40, 10, &settings), Err(KernelError::NonFinite { row: 2, column: 3 })));
    }

    #[test]
    fn a_space_built_from_chunks_equals_the_space_built_at_once() {
        let (rows, dims) = (61, 12);
        let features: Vec<f32> = (0..rows * dims).map(|i| ((i * 7919) % 1013) as f32 / 101.0 - 5.0).collect();
        for projection in [0, 5] {
            let settings = CoresetSettings { ratio: 0.1, projection, seed: 9 };
            let whole = CoresetSpace::new(&features, rows, dims, &settings).unwrap();
            // Chunks of 3, 13 and 45 rows: block boundaries (8 points) fall inside them.
            let chunks = || [&features[..3 * dims], &features[3 * dims..16 * dims], &features[16 * dims..]];
            assert_eq!(CoresetSpace::from_chunks(rows, dims, &settings, chunks).unwrap(), whole, "projection {projection}");
            let values = whole.to_rows();
            assert!(values.iter().all(|v| v.fract() == 0.0 && v.abs() <= GRID_MAX));
            assert!(values.iter().any(|v| v.abs() == GRID_MAX), "the largest magnitude spans the grid");
            for i in [0, 7, 8, 60] {
                assert_eq!(whole.row(i), values[i * whole.dims()..][..whole.dims()], "row {i}");
            }
        }
        let settings = CoresetSettings::default();
        let short = || [&features[..3 * dims]];
        assert!(matches!(CoresetSpace::from_chunks(rows, dims, &settings, short), Err(KernelError::Shape(_))));
        let mut bad = features.clone();
        bad[5 * dims + 2] = f32::INFINITY;
        let chunks = || [&bad[..3 * dims], &bad[3 * dims..]];
        assert!(matches!(CoresetSpace::from_chunks(rows, dims, &settings, chunks), Err(KernelError::NonFinite { row: 5, column: 2 })));
    }

    #[test]
    fn grid_values_square_exactly() {
        let scale = grid_scale(3.5).unwrap();
        assert_eq!(to_grid(3.5, scale), GRID_MAX);
        assert_eq!(to_grid(-3.5, scale), -GRID_MAX);
        let t = 2.0 * GRID_MAX;
        assert!(GRID_MAX <= i8::MAX as f32, "coordinates are stored as i8");
        assert!(128.0 * (t as f64).powi(2) < (1u64 << 24) as f64, "128 of the largest squared differences sum exactly in f32");
        assert!(grid_scale(f32::INFINITY).is_err());
        assert_eq!(grid_scale(0.0).unwrap(), 1.0);
    }
}
