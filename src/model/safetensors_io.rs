//! safetensors files over `memmap2`: one file or a sharded
//! `model.safetensors.index.json`, read without copying the file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{tensor::Metadata, Dtype, SafeTensors};

use crate::ops::HostWeight;

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    meta: Metadata,
}

/// Every tensor of a checkpoint, by name, each a view into its file's map.
pub struct TensorStore {
    files: Vec<MappedFile>,
    index: HashMap<String, usize>,
    /// What a missing-tensor error names (the model directory or the file).
    origin: String,
}

impl TensorStore {
    /// A model directory: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` lists.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            let mut s = Self::open_files(&[single])?;
            s.origin = dir.display().to_string();
            return Ok(s);
        }
        if !index.exists() {
            bail!("{}: no model.safetensors nor model.safetensors.index.json", dir.display());
        }
        let v = crate::util::read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let mut shards: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .with_context(|| format!("{}: weight_map[{name}] is not a file name", index.display()))?;
            if !shards.iter().any(|s| s == file) {
                shards.push(file.to_string());
            }
        }
        shards.sort();
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let mut s = Self::open_files(&paths)?;
        for (name, file) in map {
            let file = file.as_str().unwrap_or_default();
            let Some(&fi) = s.index.get(name) else {
                bail!("{}: lists tensor `{name}` in {file}, which does not hold it", index.display());
            };
            ensure!(
                s.files[fi].path.file_name().and_then(|f| f.to_str()) == Some(file),
                "{}: tensor `{name}` is listed in {file} but stored in {}",
                index.display(),
                s.files[fi].path.display()
            );
        }
        s.origin = dir.display().to_string();
        Ok(s)
    }

    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(&[path.to_path_buf()])
    }

    fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: checkpoints are read-only inputs; a file changed under a running
            // process is outside what tuneloop can guard against, as for any mmap reader.
            let mmap = unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a valid safetensors file ({e}); is it truncated or corrupt?",
                    path.display()
                )
            })?;
            for name in meta.tensors().keys() {
                if index.insert(name.clone(), files.len()).is_some() {
                    bail!("tensor `{name}` appears in more than one shard (second: {})", path.display());
                }
            }
            files.push(MappedFile { path: path.clone(), mmap, data_start: 8 + n, meta });
        }
        let origin = paths.first().map(|p| p.display().to_string()).unwrap_or_default();
        Ok(Self { files, index, origin })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    pub fn get<'a>(&'a self, name: &'a str) -> Result<HostWeight<'a>> {
        let Some(&fi) = self.index.get(name) else {
            bail!("{}: missing tensor `{name}`", self.origin);
        };
        let f = &self.files[fi];
        let info =
            f.meta.info(name).with_context(|| format!("{}: tensor `{name}` vanished", f.path.display()))?;
        let (a, b) = info.data_offsets;
        Ok(HostWeight {
            name,
            shape: info.shape.clone(),
            dtype: info.dtype,
            bytes: &f.mmap[f.data_start + a..f.data_start + b],
        })
    }

    /// A tensor whose shape must be `shape`.
    pub fn get_shaped<'a>(&'a self, name: &'a str, shape: &[usize]) -> Result<HostWeight<'a>> {
        let w = self.get(name)?;
        ensure!(
            w.shape == shape,
            "{}: tensor `{name}` has shape {:?}, expected {:?} from the config",
            self.origin,
            w.shape,
            shape
        );
        Ok(w)
    }
}

/// The floating-point dtypes a weight is read from and written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    Bf16,
    F16,
}

impl FloatDtype {
    /// `None` for a dtype that is not F32, BF16 or F16.
    pub fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(Self::F32),
            Dtype::BF16 => Some(Self::Bf16),
            Dtype::F16 => Some(Self::F16),
            _ => None,
        }
    }

    /// Bytes an element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    pub fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }

    /// Little-endian element bytes as f32 values.
    pub fn decode(self, b: &[u8]) -> Vec<f32> {
        match self {
            Self::F32 => {
                b.par_chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            Self::Bf16 => b.par_chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Self::F16 => b.par_chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }

    /// f32 values as little-endian element bytes of this dtype (rounded to nearest even).
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => v.par_iter().flat_map_iter(|x| x.to_le_bytes()).collect(),
            Self::Bf16 => v.par_iter().flat_map_iter(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            Self::F16 => v.par_iter().flat_map_iter(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        }
    }
}

/// A floating-point tensor as f32 values (F32, BF16 and F16 are accepted).
pub fn decode_f32(w: &HostWeight) -> Result<Vec<f32>> {
    match FloatDtype::of(w.dtype) {
        Some(f) => Ok(f.decode(w.bytes)),
        None => bail!("tensor `{}` has dtype {:?}; expected F32, BF16 or F16", w.name, w.dtype),
    }
}

/// An integer tensor (I64 or I32) as i64 values.
pub fn decode_i64(w: &HostWeight) -> Result<Vec<i64>> {
    let b = w.bytes;
    Ok(match w.dtype {
        Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
        Dtype::I32 => {
            b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
        }
        other => bail!("tensor `{}` has dtype {other:?}; expected I64 or I32", w.name),
    })
}

/// The metadata PyTorch writes (`format: pt`), which transformers expects.
pub fn pt_metadata() -> Option<HashMap<String, String>> {
    Some([("format".to_string(), "pt".to_string())].into_iter().collect())
}

/// Downloads each named tensor and writes them all as f32 safetensors (PyTorch's
/// `format: pt` metadata), atomically.
pub fn save_named<'a, O: crate::ops::Ops>(
    ops: &O,
    named: impl IntoIterator<Item = (String, &'a O::Tensor)>,
    path: &Path,
) -> Result<()>
where
    O::Tensor: 'a,
{
    save_named_as(ops, named, path, |_| FloatDtype::F32)
}

/// [`save_named`] with each tensor stored as `dtype_of(name)` (f32 values rounded to
/// nearest even for BF16 and F16).
pub fn save_named_as<'a, O: crate::ops::Ops>(
    ops: &O,
    named: impl IntoIterator<Item = (String, &'a O::Tensor)>,
    path: &Path,
    dtype_of: impl Fn(&str) -> FloatDtype,
) -> Result<()>
where
    O::Tensor: 'a,
{
    let mut tensors = Vec::new();
    for (name, t) in named {
        let dtype = dtype_of(&name);
        tensors.push((name, ops.shape(t).to_vec(), dtype, ops.download(t)?));
    }
    let views = tensors.iter().map(|(name, shape, dtype, values)| {
        (name.clone(), Encoded { dtype: *dtype, shape: shape.clone(), values })
    });
    write_views(path, views, pt_metadata())
}

/// f32 values stored as `dtype`: F32 as they are, BF16 and F16 rounded when the writer
/// reaches them.
struct Encoded<'a> {
    dtype: FloatDtype,
    shape: Vec<usize>,
    values: &'a [f32],
}

impl safetensors::View for Encoded<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.dtype()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.dtype {
            FloatDtype::F32 => bytemuck::cast_slice(self.values).into(),
            other => other.encode(self.values).into(),
        }
    }

    fn data_len(&self) -> usize {
        self.values.len() * self.dtype.size()
    }
}

/// Writes f32 tensors (safetensors stores them sorted by name) with optional metadata,
/// atomically ([`write_views`]).
pub fn write_f32(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views = tensors.iter().map(|(name, (shape, values))| {
        (name.clone(), Encoded { dtype: FloatDtype::F32, shape: shape.clone(), values })
    });
    write_views(path, views, metadata)
}

/// Writes a safetensors file of `tensors` at `path`, each tensor's bytes taken from its
/// view when the writer reaches them (never the whole file in memory), then synced to
/// disk and renamed into place: a reader sees the old file or the whole new one, as
/// [`crate::util::atomic_write`] gives for bytes.
pub fn write_views<V: safetensors::View>(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, V)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let tmp = crate::util::temp_file_beside(path)?.into_temp_path();
    safetensors::serialize_to_file(tensors, metadata, &tmp)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
