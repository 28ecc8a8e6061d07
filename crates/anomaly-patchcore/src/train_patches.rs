//! The training images' patches on their way to a bank. They stay in memory while the fit's memory
//! budget holds them with the coreset's working set; beyond it they go to a spill file, which the fit
//! reads back memory-mapped a chunk of images at a time, releasing each chunk's pages once read, so a
//! training set larger than memory fits.

use std::borrow::Cow;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anomaly_fs::ScratchFile;
use memmap2::Mmap;

use anomaly_detector::Compute;

use crate::{LEAVE_ONE_OUT_K, PatchCoreConfig, PatchCoreError, PatchGeometry};

/// Largest chunk of spilled patches read back at once: big enough to keep the kNN busy, small enough to
/// leave the budget to the coreset.
const MAX_CHUNK_BYTES: u64 = 256 << 20;

/// The coreset's working set on the CPU, in quarters of its points' bytes (the 8-bit grid's coordinates,
/// an index, a running minimum and the pick that set it, [`CPU_POINT_BYTES`] besides the coordinates):
/// the selection's plain scan and cells are the projection itself, and a cell, or the scan's points as
/// they are sorted into cells, gives its room back once a fifth of it is empty (`coreset_cells.rs`), so
/// they never hold more than 5/4 of it.
const CPU_CELL_QUARTERS: u64 = 5;

/// Bytes per point of the CPU selection besides its coordinates: an index, a running minimum and (while
/// it is a plain scan) the pick that set it, 4 each.
const CPU_POINT_BYTES: u64 = 12;

/// Bytes per pick the CPU selection holds beside its cells' room, besides the pick's f32 coordinates
/// (`4 × P`): the cell's bookkeeping and the allocator's partly used pages among tens of thousands of
/// small cells. Measured: the resident set grew 2.7 KiB a pick over 15,000 picks of 1 M clustered
/// 128-d points, 0.9 KiB of it the cells' own room (counted in `CPU_CELL_QUARTERS`).
const CPU_PICK_BYTES: u64 = 1536;

/// What a fit needs in memory, and whether its patches fit in the budget or spill to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    budget: u64,
    spills: bool,
    chunk_images: usize,
    features: u64,
    working: u64,
}

impl MemoryPlan {
    /// Plans a fit of `images` images' patches within `budget` bytes, its coreset selected by `compute`:
    /// in memory when the patches, the coreset's working set and the bank fit, else spilled and read back
    /// in chunks as large as what is left allows.
    pub fn new(
        images: usize,
        geometry: PatchGeometry,
        config: &PatchCoreConfig,
        compute: &Compute,
        budget: u64,
    ) -> Result<Self, PatchCoreError> {
        let (per_image, dim) = (geometry.per_image() as u64, geometry.patch_dim as u64);
        let patches = images as u64 * per_image;
        let settings = config.coreset();
        let space_dims = settings.space_dims(dim as usize) as u64;
        let picks = settings.picks(patches.max(1) as usize) as u64;
        let coreset = match compute {
            Compute::Cpu => CPU_CELL_QUARTERS * patches * (space_dims + CPU_POINT_BYTES) / 4 + picks * (space_dims * 4 + CPU_PICK_BYTES),
            // The 8-bit space, and its device copy with the running minima (host memory on a software
            // adapter), counted twice for the copy each chunk is staged through on its way; then the
            // leave-one-out's patches on the device (uploaded a bounded part at a time), staged the same way.
            Compute::Gpu(kernels) => patches * space_dims + 2 * patches * (space_dims + 4) + 2 * kernels.limits().max_upload_bytes,
        };
        let bank = picks * dim * 4;
        // The bank twice: the model file's bytes are built beside it when the fit is saved.
        let working = coreset + 2 * bank;
        // An image's patches and their leave-one-out neighbours (a distance and an index each).
        let per_image_bytes = per_image * (dim * 4 + LEAVE_ONE_OUT_K as u64 * 8);
        let features = images as u64 * per_image_bytes;
        if working + features <= budget {
            return Ok(Self { budget, spills: false, chunk_images: images.max(1), features, working });
        }
        let minimum = working + per_image_bytes;
        if minimum > budget {
            return Err(PatchCoreError::BudgetTooSmall { budget, minimum, patches, space_dims: space_dims as usize });
        }
        let fit = (budget - working) / per_image_bytes;
        let chunk_images = fit.min((MAX_CHUNK_BYTES / per_image_bytes).max(1)).min(images as u64).max(1) as usize;
        Ok(Self { budget, spills: true, chunk_images, features, working })
    }

    /// Whether the patches go to a spill file.
    pub fn spills(&self) -> bool {
        self.spills
    }

    /// Images whose patches are read (and scored for the threshold) at once.
    pub fn chunk_images(&self) -> usize {
        self.chunk_images
    }

    /// The budget planned for, in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes of the training patches (with their leave-one-out neighbours).
    pub fn features_bytes(&self) -> u64 {
        self.features
    }

    /// Bytes the coreset and the bank hold whatever the chunking.
    pub fn working_bytes(&self) -> u64 {
        self.working
    }
}

/// Receives the training images' patches as the backbone makes them, into memory or a spill file as
/// the [`MemoryPlan`] says.
pub struct TrainPatchesWriter {
    geometry: PatchGeometry,
    chunk_images: usize,
    images: usize,
    sink: Sink,
}

enum Sink {
    Memory(Vec<f32>),
    Spill { file: BufWriter<ScratchFile>, path: PathBuf },
}

impl TrainPatchesWriter {
    /// A writer for `images` images' patches; a spilling plan creates its file in `spill_dir`: unnamed on
    /// Linux, so that nothing is left even if the run is killed; elsewhere removed when the patches are
    /// dropped, or when anything fails.
    pub fn new(plan: &MemoryPlan, geometry: PatchGeometry, images: usize, spill_dir: &Path) -> Result<Self, PatchCoreError> {
        let sink = if plan.spills {
            let file = ScratchFile::create_in(spill_dir, ".anomaly-patches-", ".f32")
                .map_err(|error| PatchCoreError::Spill { path: spill_dir.to_path_buf(), source: error.source })?;
            let path = file.shown().to_path_buf();
            Sink::Spill { file: BufWriter::with_capacity(1 << 20, file), path }
        } else {
            Sink::Memory(Vec::with_capacity(images * geometry.per_image() * geometry.patch_dim))
        };
        Ok(Self { geometry, chunk_images: plan.chunk_images, images: 0, sink })
    }

    /// The spill file, when the patches go to one.
    pub fn spill_path(&self) -> Option<&Path> {
        match &self.sink {
            Sink::Memory(_) => None,
            Sink::Spill { path, .. } => Some(path),
        }
    }

    /// Appends whole images' patches (row-major `images × per_image × patch_dim`).
    pub fn push(&mut self, values: &[f32]) -> Result<(), PatchCoreError> {
        let image_len = self.geometry.per_image() * self.geometry.patch_dim;
        if !values.len().is_multiple_of(image_len) {
            return Err(PatchCoreError::Shape(format!("{} values are not whole images of {image_len}", values.len())));
        }
        match &mut self.sink {
            Sink::Memory(rows) => rows.extend_from_slice(values),
            Sink::Spill { file, path } => {
                file.write_all(bytemuck::cast_slice(values)).map_err(|source| PatchCoreError::Spill { path: path.clone(), source })?
            }
        }
        self.images += values.len() / image_len;
        Ok(())
    }

    /// The patches written, ready to be read back.
    pub fn finish(self) -> Result<TrainPatches<'static>, PatchCoreError> {
        let storage = match self.sink {
            Sink::Memory(rows) => Storage::Memory(Cow::Owned(rows)),
            Sink::Spill { file, path } => {
                let file = file.into_inner().map_err(|e| PatchCoreError::Spill { path: path.clone(), source: e.into_error() })?;
                // SAFETY: the file is this run's own scratch file, written in full above and never written
                // again while mapped.
                let map = unsafe { Mmap::map(file.file()) }.map_err(|source| PatchCoreError::Spill { path, source })?;
                Storage::Spilled { map, _file: file }
            }
        };
        Ok(TrainPatches { geometry: self.geometry, images: self.images, chunk_images: self.chunk_images, storage })
    }
}

/// The training images' patches, in memory or memory-mapped from a spill file, read in chunks of
/// whole images.
pub struct TrainPatches<'a> {
    geometry: PatchGeometry,
    images: usize,
    chunk_images: usize,
    storage: Storage<'a>,
}

enum Storage<'a> {
    Memory(Cow<'a, [f32]>),
    /// The file goes away when dropped.
    Spilled {
        map: Mmap,
        _file: ScratchFile,
    },
}

impl<'a> TrainPatches<'a> {
    /// Patches already in memory (row-major `images × per_image × patch_dim`), read as one chunk.
    pub fn in_memory(values: &'a [f32], geometry: PatchGeometry) -> Result<Self, PatchCoreError> {
        let (per_image, dim) = (geometry.per_image(), geometry.patch_dim);
        if per_image == 0 || dim == 0 || !values.len().is_multiple_of(per_image * dim) {
            return Err(PatchCoreError::Shape(format!("{} values are not images of {per_image} patches of {dim}", values.len())));
        }
        let images = values.len() / (per_image * dim);
        Ok(Self { geometry, images, chunk_images: images.max(1), storage: Storage::Memory(Cow::Borrowed(values)) })
    }

    /// Where the patches come from.
    pub fn geometry(&self) -> PatchGeometry {
        self.geometry
    }

    /// Training images.
    pub fn images(&self) -> usize {
        self.images
    }

    /// Training patches (rows).
    pub fn rows(&self) -> usize {
        self.images * self.geometry.per_image()
    }

    /// Whether the patches are read from a spill file.
    pub fn spilled(&self) -> bool {
        matches!(self.storage, Storage::Spilled { .. })
    }

    /// The patches in consecutive chunks of whole images: `(first image, values)`. A spilled chunk's
    /// pages are released when the next is read, and the last one's when the iterator is dropped.
    pub fn chunks(&self) -> Chunks<'_> {
        let (values, map): (&[u8], _) = match &self.storage {
            Storage::Memory(rows) => (bytemuck::cast_slice(rows), None),
            Storage::Spilled { map, .. } => (map, Some(map)),
        };
        let image_bytes = self.geometry.per_image() * self.geometry.patch_dim * 4;
        Chunks::new(values, map, self.chunk_images * image_bytes, image_bytes)
    }

    /// The rows at `picks` (ascending), gathered in one pass.
    pub fn gather(&self, picks: &[u32]) -> Vec<f32> {
        let dim = self.geometry.patch_dim;
        let per_image = self.geometry.per_image();
        let mut rows = Vec::with_capacity(picks.len() * dim);
        let mut next = picks.iter().peekable();
        for (first_image, chunk) in self.chunks() {
            let first_row = first_image * per_image;
            let end_row = first_row + chunk.len() / dim;
            while let Some(&&pick) = next.peek() {
                let pick = pick as usize;
                if pick >= end_row {
                    break;
                }
                rows.extend_from_slice(&chunk[(pick - first_row) * dim..][..dim]);
                next.next();
            }
        }
        rows
    }
}

/// Consecutive chunks of whole units (images, or bank rows) of f32 values: `(first unit, values)`. Over
/// a memory map, a chunk's pages are released when the next is read, and the last one's on drop.
pub struct Chunks<'a> {
    values: &'a [u8],
    map: Option<&'a Mmap>,
    /// Where `values` start in `map`.
    base: usize,
    chunk_bytes: usize,
    unit_bytes: usize,
    /// Bytes read so far.
    offset: usize,
    /// Bytes whose pages were released.
    released: usize,
}

impl<'a> Chunks<'a> {
    /// Chunks of `chunk_bytes` (whole units of `unit_bytes`) of `values`, which lie within `map` when given.
    pub(crate) fn new(values: &'a [u8], map: Option<&'a Mmap>, chunk_bytes: usize, unit_bytes: usize) -> Self {
        let chunk_bytes = (chunk_bytes / unit_bytes.max(1)).max(1) * unit_bytes;
        let base = map.map_or(0, |map| values.as_ptr() as usize - map.as_ptr() as usize);
        Self { values, map, base, chunk_bytes, unit_bytes, offset: 0, released: 0 }
    }

    /// Releases the mapped pages read since the last release (they are read from the file again if
    /// touched again).
    fn release(&mut self) {
        #[cfg(unix)]
        if let Some(map) = self.map
            && self.offset > self.released
        {
            // SAFETY: the map is a read-only shared mapping of a file; dropping its pages only makes
            // the next access read them from the file again, with the same bytes.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.base + self.released, self.offset - self.released)
            };
        }
        self.released = self.offset;
    }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = (usize, &'a [f32]);

    fn next(&mut self) -> Option<Self::Item> {
        self.release();
        if self.offset >= self.values.len() || self.chunk_bytes == 0 {
            return None;
        }
        let end = (self.offset + self.chunk_bytes).min(self.values.len());
        let chunk = &self.values[self.offset..end];
        let first = self.offset / self.unit_bytes;
        self.offset = end;
        Some((first, bytemuck::cast_slice(chunk)))
    }
}

impl Drop for Chunks<'_> {
    fn drop(&mut self) {
        self.release();
    }
}
