//! Host side of `shaders/topk.wgsl`: the k smallest distances of every row merged into a running best
//! list, one bank chunk at a time, so that the k nearest are kept without holding all distances.

use burn::tensor::wgpu::wgpu;
use burn::tensor::wgpu::wgpu::util::DeviceExt;
use bytemuck::{Pod, Zeroable};

use crate::context::{Gpu, Kernel, MatrixChunk, Slot, shader_module};
use crate::distance_subgroup::{NearestSlots, fixed_subgroup_size};

/// Largest k the kernel keeps (the shader's `MAX_K`: the most entries a row collects in workgroup memory).
pub(crate) const MAX_K: usize = 1024;
const _: () = assert!(MAX_K.is_power_of_two(), "the shader sorts up to MAX_K entries bitonically");

/// The shader's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    rows: u32,
    width: u32,
    k: u32,
    prev: u32,
    index_offset: u32,
    slots: u32,
    slot_width: u32,
    _pad: u32,
}

/// Rows per workgroup of `nearest_of_slots`, one an invocation (the shader's `SLOT_ROWS`).
const SLOT_ROWS: usize = 64;

/// Largest k whose top-k bounds its reads (the shader's `THREADS`), with the slot minima that serve
/// that bound; a larger k takes the radix select over every distance.
pub(crate) const MAX_BOUNDED_K: usize = 256;

/// Candidates each lane of `topk_slots.wgsl` keeps for its bound (the shader's `KEPT`): it serves
/// k ≤ KEPT × the subgroup size.
const KEPT: usize = 8;

/// The shader's entry points: the top-k for any k over the distances alone; bounded by slot minima, in
/// two passes (the rows the bound serves, then the rows it listed, dispatched indirectly); and single
/// passes for k = 1 over distances or over the subgroup shader's nearest slots.
pub(crate) struct TopKKernel {
    select: Kernel,
    bounded: Kernel,
    /// `topk_slots.wgsl`'s first pass in place of `bounded`, a subgroup a row, and the largest k it
    /// serves: where the device has subgroups of a fixed size.
    bounded_by_subgroups: Option<(Kernel, usize)>,
    listed: Kernel,
    nearest: Kernel,
    nearest_of_slots: Kernel,
}

impl TopKKernel {
    pub fn new(device: &wgpu::Device) -> Self {
        let module = shader_module(device, "topk", include_str!("../../../shaders/topk.wgsl"));
        let slots = [Slot::Uniform, Slot::Read, Slot::Read, Slot::Read, Slot::Write, Slot::Write];
        let constants = [("MAX_K", MAX_K as f64)];
        let with_slots = [Slot::Uniform, Slot::Read, Slot::Read, Slot::Read, Slot::Write, Slot::Write, Slot::Read];
        let slotted = |entry: &str, listing: Slot, bounded_only: bool| {
            let mut slots = with_slots.to_vec();
            slots.push(listing);
            let constants = [("MAX_K", MAX_K as f64), ("SLOTTED", 1.0), ("BOUNDED_ONLY", f64::from(u8::from(bounded_only)))];
            Kernel::new(device, &module, entry, &slots, &constants)
        };
        let bounded_by_subgroups = fixed_subgroup_size(device).map(|size| {
            // WGSL has no includes: the subgroup entry point is appended to the module it shares its
            // bindings and helpers with, which only devices with subgroups compile.
            let source = concat!(include_str!("../../../shaders/topk.wgsl"), include_str!("../../../shaders/topk_slots.wgsl"));
            let module = shader_module(device, "topk_slots", source);
            let mut slots = with_slots.to_vec();
            slots.push(Slot::Write);
            let constants = [("MAX_K", MAX_K as f64), ("SLOTTED", 1.0), ("SG", f64::from(size))];
            (Kernel::new(device, &module, "topk_slots", &slots, &constants), KEPT * size as usize)
        });
        Self {
            select: Kernel::new(device, &module, "topk", &with_slots, &[("MAX_K", MAX_K as f64), ("SLOTTED", 0.0)]),
            bounded: slotted("topk_bounded", Slot::Write, true),
            bounded_by_subgroups,
            listed: slotted("topk_listed", Slot::Read, false),
            nearest: Kernel::new(device, &module, "nearest", &slots, &constants),
            nearest_of_slots: Kernel::new(device, &module, "nearest_of_slots", &with_slots, &constants),
        }
    }

    /// Encodes the merge of one bank chunk's new entries (for `rows` queries) into `best`.
    pub fn encode_merge(&self, gpu: &Gpu, pass: &mut wgpu::ComputePass, best: &mut RunningBest, entries: ChunkEntries, rows: usize) {
        // The buffers of bindings 1 and 6 (where the entry point has it), the entries' width, first bank
        // row, slot minima per row and width, rows per workgroup, and the pass over the rows the first
        // one lists, if any.
        let (kernel, buffers, width, start, (slots, slot_width), rows_per_group, listed) = match entries {
            ChunkEntries::Distances(distances, chunk, _) if best.k == 1 => {
                (&self.nearest, vec![distances], chunk.rows, chunk.start, (0, 0), 1, None)
            }
            ChunkEntries::Distances(distances, chunk, Some(minima)) => {
                let bounded = match &self.bounded_by_subgroups {
                    Some((kernel, max_k)) if best.k <= *max_k => kernel,
                    _ => &self.bounded,
                };
                (bounded, vec![distances, minima.keys], chunk.rows, chunk.start, (minima.slots, minima.width), 1, Some(&self.listed))
            }
            // The plain top-k never reads binding 6: the distances stand in.
            ChunkEntries::Distances(distances, chunk, None) => {
                (&self.select, vec![distances, distances], chunk.rows, chunk.start, (0, 0), 1, None)
            }
            ChunkEntries::Nearest { found, slots, start } => {
                (&self.nearest_of_slots, vec![&found.keys, &found.rows], slots, start, (0, 0), SLOT_ROWS, None)
            }
        };
        let params = gpu.uniform(&Params {
            rows: rows as u32,
            width: width as u32,
            k: best.k as u32,
            prev: if best.merged == 0 { 0 } else { best.k as u32 },
            index_offset: start as u32,
            slots: slots as u32,
            slot_width: slot_width as u32,
            _pad: 0,
        });
        let (src, dst) = (&best.lists[best.current], &best.lists[1 - best.current]);
        let mut bound = vec![&params, buffers[0], &src.0, &src.1, &dst.0, &dst.1];
        bound.extend(&buffers[1..]);
        if listed.is_some() {
            bound.push(&best.listing);
        }
        gpu.dispatch(pass, kernel, &bound, gpu.row_groups(rows.div_ceil(rows_per_group)));
        if let Some(listed) = listed {
            // Usually no workgroup at all: the rows the bound left, if any (`RunningBest::clear_listing`).
            gpu.dispatch_indirect(pass, listed, &bound, &best.listing);
        }
        best.current = 1 - best.current;
        best.merged += 1;
    }
}

/// One bank chunk's new entries for a merge into the running best.
pub(crate) enum ChunkEntries<'a> {
    /// Its squared distances, `rows × chunk.rows`: row-major, or with slot minima (for k ≤
    /// `MAX_BOUNDED_K`), 4 rows to a vec4 (`SubgroupOutput::DistancesAndMinima`).
    Distances(&'a wgpu::Buffer, &'a MatrixChunk, Option<SlotMinima<'a>>),
    /// For k = 1, each query row's nearest in each of `slots` slots of the chunk that starts at bank
    /// row `start` (`SubgroupShader::encode`).
    Nearest { found: &'a NearestSlots, slots: usize, start: usize },
}

/// Per query row, the least key (distance bits, as the top-k orders them) of each slot of `width`
/// consecutive distances of a chunk, `slots` per row (`SubgroupOutput::DistancesAndMinima`).
pub(crate) struct SlotMinima<'a> {
    pub keys: &'a wgpu::Buffer,
    pub slots: usize,
    pub width: usize,
}

/// The k best (squared distances, bank indices) of a block of queries: two pairs of buffers, the best
/// of the chunks merged so far and the next, swapped after every chunk.
pub(crate) struct RunningBest {
    k: usize,
    lists: [(wgpu::Buffer, wgpu::Buffer); 2],
    current: usize,
    merged: usize,
    /// The rows a slot-bounded merge's first pass leaves to its second, as the shader's `Listing`: a
    /// count, which is the second pass's indirect dispatch (with y and z of 1), then the rows.
    listing: wgpu::Buffer,
}

impl RunningBest {
    /// Lists for blocks of up to `rows` queries.
    pub fn new(gpu: &Gpu, rows: usize, k: usize) -> Self {
        let pair = || (gpu.storage(rows * k * 4, "best values"), gpu.storage(rows * k * 4, "best indices"));
        let mut listing = vec![0u32; 3 + rows];
        listing[1..3].fill(1);
        let listing = gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("top-k listing"),
            contents: bytemuck::cast_slice(&listing),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::INDIRECT | wgpu::BufferUsages::COPY_DST,
        });
        Self { k, lists: [pair(), pair()], current: 0, merged: 0, listing }
    }

    /// Encodes the emptying of the listing, which each slot-bounded merge's compute pass must start with
    /// (the other merges do not use it).
    pub fn clear_listing(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.clear_buffer(&self.listing, 0, Some(4));
    }

    /// Starts over, for the next block of queries.
    pub fn restart(&mut self) {
        self.merged = 0;
    }

    /// Whether a chunk was merged since the last `restart`: until then `current` holds another block's
    /// values, or none.
    pub fn has_merged(&self) -> bool {
        self.merged > 0
    }

    /// The (values, indices) buffers of the best of the chunks merged so far.
    pub fn current(&self) -> (&wgpu::Buffer, &wgpu::Buffer) {
        let (values, indices) = &self.lists[self.current];
        (values, indices)
    }
}

#[cfg(test)]
mod tests {
    use crate::layout::assert_layout;

    #[test]
    fn the_bounded_k_is_the_shaders_workgroup() {
        let shader = include_str!("../../../shaders/topk.wgsl");
        assert!(shader.contains(&format!("const THREADS: u32 = {}u;", super::MAX_BOUNDED_K)));
        assert!(shader.contains("@compute @workgroup_size(256)\nfn topk("));
    }

    #[test]
    fn the_slot_merges_rows_per_group_are_the_shaders() {
        assert_eq!(crate::layout::u32_constant(include_str!("../../../shaders/topk.wgsl"), "SLOT_ROWS") as usize, super::SLOT_ROWS);
    }

    #[test]
    fn the_subgroup_bounds_kept_candidates_are_the_shaders() {
        let source = concat!(include_str!("../../../shaders/topk.wgsl"), include_str!("../../../shaders/topk_slots.wgsl"));
        assert_eq!(crate::layout::u32_constant(source, "KEPT") as usize, super::KEPT);
    }

    #[test]
    fn params_match_the_shader() {
        assert_layout!(
            super::Params { rows, width, k, prev, index_offset, slots, slot_width, _pad },
            include_str!("../../../shaders/topk.wgsl"),
            32
        );
    }
}
