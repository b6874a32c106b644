//! Value parsers for the command line: a bad value is a clap usage error (exit code 2) that
//! names the flag, for every flag.

/// The most threads `--threads` and `--decode-threads` accept: 4 × the available cores, and
/// never more than 1024. More threads than cores only add contention (a thousand on a
/// two-core machine brought decoding nearly to a halt), and tens of thousands exhaust the
/// process.
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).min(1024)
}

/// A thread count: 1 to [`max_threads`].
pub fn threads(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|e| format!("`{s}` is not a thread count: {e}"))?;
    let max = max_threads();
    if n == 0 {
        return Err("must be at least 1".into());
    }
    if n > max {
        return Err(format!(
            "{n} is more than {max} (4 × the {} available cores, at most 1024)",
            max / 4
        ));
    }
    Ok(n)
}

fn float(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if !v.is_finite() {
        return Err(format!("{s} is not finite"));
    }
    Ok(v)
}

/// A finite number ≥ 0.
pub fn non_negative(s: &str) -> Result<f32, String> {
    let v = float(s)?;
    if v < 0.0 {
        return Err(format!("{s} is negative; give a value of at least 0"));
    }
    Ok(v)
}

/// A finite number > 0.
pub fn positive(s: &str) -> Result<f32, String> {
    let v = float(s)?;
    if v <= 0.0 {
        return Err(format!("{s} must be greater than 0"));
    }
    Ok(v)
}

/// A probability threshold in (0, 1].
pub fn probability(s: &str) -> Result<f32, String> {
    let v = float(s)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("{s} is outside (0, 1]"));
    }
    Ok(v)
}

/// A quantized-kernel method name for `--quant-kernel`: `dequant` or `int8`.
pub fn quant_method(s: &str) -> Result<performer::kernels::quant::QuantMethod, String> {
    performer::kernels::quant::QuantMethod::parse(s)
        .map_err(|_| format!("`{s}` is not a quantized kernel: give dequant or int8"))
}

/// The quantized-kernel choice of every command that loads a model (flattened into each).
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct QuantKernelArgs {
    /// How products over q8_0/q4_0/q4_1 weights are computed: `int8` (the default: the
    /// activation rounded to int8 per block of 32, integer dot products by AVX-512 VNNI,
    /// AVX-VNNI or AVX2 `vpmaddubsw`, whichever the CPU has; the rounding moves the logits
    /// slightly) or `dequant` (codes widened to f32, exact activations: the logits of the
    /// dequantized f32 model, more slowly). Ignored for a float model.
    #[arg(long, value_parser = quant_method, value_name = "dequant|int8")]
    pub quant_kernel: Option<performer::kernels::quant::QuantMethod>,
    /// Keep q8_0/q4_0/q4_1 weights in the mapped file's row-major layout only. By default the
    /// int8 method's one-row products (decoding) read a copy with the rows packed four at a
    /// time, made at load: the quantized weights' size again in memory, the same logits bit
    /// for bit, faster decoding. Ignored for a float model.
    #[arg(long)]
    pub no_packed_rows: bool,
}
