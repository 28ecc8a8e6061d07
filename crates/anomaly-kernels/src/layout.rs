//! Test helpers: check a `#[repr(C)]` uniform struct against the struct of the same name in its WGSL
//! file, as naga lays it out, and host constants against the shader's, so that the two cannot drift apart.

use burn::tensor::wgpu::wgpu::naga;

/// Asserts that `$ty` has the fields of the shader's struct of the same name (`Params`, `PackParams`), in
/// order and at the same offsets, and is `$bytes` long (a multiple of 16, as uniform buffers are filled
/// in 16-byte rows).
macro_rules! assert_layout {
    ($ty:ty { $($field:ident),* $(,)? }, $source:expr, $bytes:expr) => {
        $crate::layout::check(
            stringify!($ty).rsplit("::").next().unwrap_or_default().trim(),
            &[$((stringify!($field), std::mem::offset_of!($ty, $field))),*],
            std::mem::size_of::<$ty>(),
            $source,
            $bytes,
        )
    };
}
pub(crate) use assert_layout;

/// The module of a WGSL source, parsed as wgpu would.
pub(crate) fn parse(source: &str) -> naga::Module {
    naga::front::wgsl::parse_str(source).unwrap_or_else(|e| panic!("{}", e.emit_to_string(source)))
}

/// The value of the shader's `const NAME: u32`, for host constants that must equal it.
pub(crate) fn u32_constant(source: &str, name: &str) -> u32 {
    let module = parse(source);
    let (_, constant) = module.constants.iter().find(|(_, c)| c.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no const {name}"));
    match module.global_expressions[constant.init] {
        naga::Expression::Literal(naga::Literal::U32(value)) => value,
        ref other => panic!("{name} is {other:?}, not a u32 literal"),
    }
}

pub(crate) fn check(struct_name: &str, fields: &[(&str, usize)], size: usize, source: &str, bytes: usize) {
    let module = parse(source);
    let (members, span) = module
        .types
        .iter()
        .find_map(|(_, ty)| match (&ty.name, &ty.inner) {
            (Some(name), naga::TypeInner::Struct { members, span }) if name == struct_name => Some((members, *span)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the shader declares no struct {struct_name}"));
    let wgsl: Vec<(&str, usize)> = members.iter().map(|m| (m.name.as_deref().unwrap_or("?"), m.offset as usize)).collect();
    assert_eq!(fields, wgsl.as_slice(), "field names and offsets");
    assert_eq!(size, span as usize, "size in Rust and in WGSL");
    assert_eq!(size, bytes, "expected size");
    assert_eq!(size % 16, 0, "uniform structs fill whole 16-byte rows");
}
