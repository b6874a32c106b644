//! Python bindings of the `performer` runtime: the `performer` Python module.
//!
//! `Model(path)` loads a model directory; `model.new_state()` gives a per-sequence `State`
//! whose `prefill(tokens)` and `step(token)` return the logits as a NumPy `float32` array;
//! `model.generate(prompt, ...)` streams text. Every call that computes releases the GIL.
//! Errors are `PerformerError` exceptions (with `OSError` and `ValueError` subclasses)
//! carrying the library's message.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use numpy::PyArray1;
use performer::{GenerateOptions, Generation, LoadOptions, SamplingParams};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString, PyType};

/// The exception classes, made at import (Python code: a class with two bases).
struct Errors {
    base: Py<PyType>,
    io: Py<PyType>,
    value: Py<PyType>,
}

static ERRORS: PyOnceLock<Errors> = PyOnceLock::new();

const ERRORS_SOURCE: &std::ffi::CStr = cr#"
class PerformerError(Exception):
    """An error of the performer runtime; the message is the library's."""

class PerformerIOError(PerformerError, OSError):
    """A model, tokenizer or snapshot file could not be read or written."""

class PerformerValueError(PerformerError, ValueError):
    """Bad input: a malformed model, config or snapshot, an invalid parameter, a token id out
    of range, a state of another model."""
"#;

fn errors(py: Python<'_>) -> PyResult<&Errors> {
    ERRORS.get_or_try_init(py, || {
        let globals = PyDict::new(py);
        globals.set_item("__name__", "performer")?;
        py.run(ERRORS_SOURCE, Some(&globals), None)?;
        let get = |name: &str| -> PyResult<Py<PyType>> {
            Ok(globals
                .get_item(name)?
                .ok_or_else(|| PyTypeError::new_err(format!("{name} was not defined")))?
                .cast_into::<PyType>()?
                .unbind())
        };
        Ok(Errors {
            base: get("PerformerError")?,
            io: get("PerformerIOError")?,
            value: get("PerformerValueError")?,
        })
    })
}

/// The library's error as a Python exception: I/O errors are `PerformerIOError` (an
/// `OSError`), failures of a computation (non-finite logits, memory) the base
/// `PerformerError`, everything else `PerformerValueError` (a `ValueError`).
fn to_py(e: performer::Error) -> PyErr {
    Python::attach(|py| {
        let errors = match errors(py) {
            Ok(errors) => errors,
            Err(err) => return err,
        };
        let ty = match &e {
            performer::Error::Io { .. } => &errors.io,
            performer::Error::NonFiniteLogits { .. } | performer::Error::OutOfMemory { .. } => {
                &errors.base
            }
            _ => &errors.value,
        };
        PyErr::from_type(ty.bind(py).clone(), e.to_string())
    })
}

/// The constraint of `generate`'s `json_schema` (a JSON-serializable object, or a str of
/// JSON), `grammar` (Lark) or `regex` keywords: at most one.
fn constraint(
    py: Python<'_>,
    json_schema: Option<&Bound<'_, PyAny>>,
    grammar: Option<String>,
    regex: Option<String>,
) -> PyResult<Option<performer::constraint::Constraint>> {
    use performer::constraint::Constraint;
    let given = [json_schema.is_some(), grammar.is_some(), regex.is_some()];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err(to_py(performer::Error::invalid(
            "json_schema",
            "give at most one of json_schema, grammar and regex",
        )));
    }
    if let Some(schema) = json_schema {
        let text: String = match schema.cast::<PyString>() {
            Ok(s) => s.to_str()?.to_owned(),
            Err(_) => py
                .import("json")?
                .call_method1("dumps", (schema,))?
                .extract()?,
        };
        let value = serde_json::from_str(&text).map_err(|e| {
            to_py(performer::Error::invalid(
                "json_schema",
                format!("not JSON: {e}"),
            ))
        })?;
        return Ok(Some(Constraint::JsonSchema(value)));
    }
    Ok(grammar
        .map(Constraint::Lark)
        .or(regex.map(Constraint::Regex)))
}

/// A loaded model: immutable, shared by every state and generation made from it.
///
/// `Model(path, *, kernel_eps=None, denominator_eps=None, huge_pages=False)` loads a
/// directory holding `config.json` and `model.safetensors` (and the tokenizer file its config
/// names, if any).
#[pyclass(module = "performer", frozen)]
struct Model {
    inner: Arc<performer::Model>,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, *, kernel_eps=None, denominator_eps=None, huge_pages=false))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        kernel_eps: Option<f32>,
        denominator_eps: Option<f32>,
        huge_pages: bool,
    ) -> PyResult<Self> {
        let options = LoadOptions {
            kernel_eps,
            denominator_eps,
            huge_pages,
            ..LoadOptions::default()
        };
        let model = py
            .detach(|| performer::Model::load_with(&path, options))
            .map_err(to_py)?;
        Ok(Model {
            inner: Arc::new(model),
        })
    }

    /// A fresh state (empty context) for one sequence.
    fn new_state(&self) -> State {
        State {
            model: self.inner.clone(),
            inner: Mutex::new(Some(performer::State::new(&self.inner))),
        }
    }

    /// The vocabulary size (`num_tokens`): logits have this length.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// Token ids of a text, by the model's tokenizer.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let model = &self.inner;
        py.detach(|| model.tokenizer().encode(text)).map_err(to_py)
    }

    /// The text of token ids, by the model's tokenizer.
    fn decode(&self, py: Python<'_>, tokens: Vec<u32>) -> PyResult<String> {
        let model = &self.inner;
        py.detach(|| model.tokenizer().decode(&tokens))
            .map_err(to_py)
    }

    /// The model's config and sizes as a dict: the `PerformerLM` keyword arguments and runtime
    /// keys, plus `parameters`, `dtypes`, `file`, `file_bytes`, `weight_bytes_per_token` and
    /// `state_bytes`.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = &self.inner;
        let c = m.config();
        let d = PyDict::new(py);
        d.set_item("num_tokens", c.num_tokens)?;
        d.set_item("max_seq_len", c.max_seq_len)?;
        d.set_item("dim", c.dim)?;
        d.set_item("depth", c.depth)?;
        d.set_item("heads", c.heads)?;
        d.set_item("dim_head", c.dim_head)?;
        d.set_item("nb_features", c.nb_features)?;
        d.set_item("causal", c.causal)?;
        d.set_item("ff_mult", c.ff_mult)?;
        d.set_item("ff_glu", c.ff_glu)?;
        d.set_item("generalized_attention", c.generalized_attention)?;
        d.set_item("kernel_fn", c.kernel_fn.name())?;
        d.set_item("use_scalenorm", c.use_scalenorm)?;
        d.set_item("use_rezero", c.use_rezero)?;
        d.set_item("tie_embed", c.tie_embed)?;
        d.set_item("rotary_position_emb", c.rotary_position_emb)?;
        d.set_item("axial_position_emb", c.axial_position_emb)?;
        d.set_item("axial_position_shape", c.axial_position_shape)?;
        d.set_item("local_attn_heads", c.local_attn_heads.clone())?;
        d.set_item("local_window_size", c.local_window_size)?;
        d.set_item("shift_tokens", c.shift_tokens)?;
        d.set_item("qkv_bias", c.qkv_bias)?;
        d.set_item("attn_out_bias", c.attn_out_bias)?;
        d.set_item("no_projection", c.no_projection)?;
        d.set_item("kernel_eps", c.kernel_eps)?;
        d.set_item("denominator_eps", c.denominator_eps)?;
        d.set_item("tokenizer", c.tokenizer.name())?;
        d.set_item("parameters", m.parameter_count())?;
        let dtypes = PyDict::new(py);
        for (dtype, n) in m.dtype_counts() {
            dtypes.set_item(dtype.to_string(), n)?;
        }
        d.set_item("dtypes", dtypes)?;
        d.set_item("file", m.weights().path().to_string_lossy())?;
        d.set_item("file_bytes", m.weights().file_size())?;
        d.set_item("weight_bytes_per_token", m.weight_bytes_per_token())?;
        d.set_item("state_bytes", performer::State::new(m).size_bytes())?;
        Ok(d)
    }

    /// Streams generated text: an iterator of `str` pieces, each a whole number of
    /// characters, computed as it is iterated (the GIL is released meanwhile).
    ///
    /// `prompt` is a `str` (encoded by the model's tokenizer) or a list of token ids. With
    /// `state`, the generation continues that state (an empty prompt is then allowed) and
    /// leaves it holding the prompt and the generated tokens; the state cannot be used while
    /// the generation runs. `temperature=0` is greedy decoding; the same `seed` gives the same
    /// text; `top_k=0` and `top_p=1` disable those filters; generation ends after `max_tokens`
    /// tokens or at the first of the `stop` strings (not emitted).
    ///
    /// Structured output (at most one): `json_schema` (a dict, or a str of JSON) makes the
    /// text compact JSON valid against that schema, `grammar` a str in llguidance's Lark
    /// dialect, `regex` a regular expression; generation then also ends when the value is
    /// complete. An invalid or unsupported one raises `ValueError` at the call. Output cut by
    /// `max_tokens` may be incomplete.
    #[pyo3(signature = (prompt, *, max_tokens=256, temperature=0.8, top_k=40, top_p=0.95,
                        repetition_penalty=1.0, seed=42, stop=None, state=None,
                        json_schema=None, grammar=None, regex=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        repetition_penalty: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        state: Option<Py<State>>,
        json_schema: Option<&Bound<'_, PyAny>>,
        grammar: Option<String>,
        regex: Option<String>,
    ) -> PyResult<TextStream> {
        let model = self.inner.clone();
        let constraint = constraint(py, json_schema, grammar, regex)?;
        if let Some(c) = &constraint {
            // Compiled here too, so that a bad one raises at the call.
            performer::constraint::Grammar::compile(c, model.tokenizer(), model.vocab_size())
                .map_err(to_py)?;
        }
        let tokens: Vec<u32> = if let Ok(text) = prompt.cast::<PyString>() {
            let text = text.to_str()?;
            py.detach(|| model.tokenizer().encode(text))
                .map_err(to_py)?
        } else {
            prompt
                .extract()
                .map_err(|_| PyTypeError::new_err("prompt must be a str or a list of token ids"))?
        };
        let options = GenerateOptions {
            max_tokens,
            stop: stop.unwrap_or_default(),
            sampling: SamplingParams {
                temperature,
                top_k: (top_k > 0).then_some(top_k),
                top_p: (top_p != 1.0).then_some(top_p),
                repetition_penalty,
                seed,
                ..SamplingParams::default()
            },
            constraint,
            ..GenerateOptions::default()
        };
        // Validated here, so that bad parameters raise at the call, not at the first piece.
        options.sampling.validate().map_err(to_py)?;
        let run_state = match &state {
            Some(s) => {
                let s = s.get();
                if !Arc::ptr_eq(&s.model, &model) {
                    return Err(to_py(performer::Error::StateMismatch(
                        "the state was made by another Model object".into(),
                    )));
                }
                s.take()?
            }
            None => performer::State::new(&model),
        };
        TextStream::start(py, model, run_state, tokens, options, state)
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({:?}, vocab_size={}, tokenizer={:?})",
            self.inner
                .weights()
                .path()
                .parent()
                .unwrap_or(std::path::Path::new("")),
            self.inner.vocab_size(),
            self.inner.tokenizer().name()
        )
    }
}

/// The attention state of one sequence: constant size, advanced token by token.
///
/// Made by `Model.new_state()`, `State.fork()` or `State.from_bytes(model, data)`.
#[pyclass(module = "performer", frozen)]
struct State {
    model: Arc<performer::Model>,
    /// `None` while a generation runs on the state.
    inner: Mutex<Option<performer::State>>,
}

impl State {
    /// Runs `f` on the state with the GIL released.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&performer::Model, &mut performer::State) -> performer::Result<T> + Send,
    ) -> PyResult<T> {
        let model = &self.model;
        let inner = &self.inner;
        py.detach(|| {
            let mut guard = inner.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_mut() {
                Some(state) => Ok(f(model, state)),
                None => Err(()),
            }
        })
        .map_err(|()| in_use())?
        .map_err(to_py)
    }

    /// Takes the state out for a generation.
    fn take(&self) -> PyResult<performer::State> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(in_use)
    }

    fn put_back(&self, state: performer::State) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }
}

fn in_use() -> PyErr {
    to_py(performer::Error::invalid(
        "state",
        "the state is in use by a running generation (exhaust or close it first)",
    ))
}

fn logits_array<'py>(py: Python<'py>, logits: &[f32]) -> Bound<'py, PyArray1<f32>> {
    PyArray1::from_slice(py, logits)
}

#[pymethods]
impl State {
    /// Consumes `tokens` (a list of ids, chunked and parallel) and returns the logits after
    /// the last one: a `float32` array of `vocab_size`.
    fn prefill<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let logits = self.with(py, |m, s| m.prefill(s, &tokens).map(<[f32]>::to_vec))?;
        Ok(logits_array(py, &logits))
    }

    /// Consumes one token and returns the logits after it.
    fn step<'py>(&self, py: Python<'py>, token: u32) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let logits = self.with(py, |m, s| m.step(s, token).map(<[f32]>::to_vec))?;
        Ok(logits_array(py, &logits))
    }

    /// The logits after the last consumed token, or `None` for an empty context.
    #[getter]
    fn logits<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        let logits = self.with(py, |_, s| Ok(s.logits().map(<[f32]>::to_vec)))?;
        Ok(logits.map(|l| logits_array(py, &l)))
    }

    /// Tokens consumed so far.
    #[getter]
    fn position(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |_, s| Ok(s.position()))
    }

    /// Bytes the state occupies (constant in the sequence length).
    #[getter]
    fn size_bytes(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |_, s| Ok(s.size_bytes()))
    }

    /// Empties the context.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |_, s| {
            s.reset();
            Ok(())
        })
    }

    /// An independent copy: advancing one does not change the other.
    fn fork(&self, py: Python<'_>) -> PyResult<State> {
        let copy = self.with(py, |_, s| Ok(s.fork()))?;
        Ok(State {
            model: self.model.clone(),
            inner: Mutex::new(Some(copy)),
        })
    }

    /// A versioned, checksummed snapshot of the state (`bytes`), restored bit-exactly by
    /// `State.from_bytes(model, data)` with the same model.
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.with(py, |m, s| s.to_bytes(m))?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Restores a snapshot made by `to_bytes` (checked against `model`).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, model: &Model, data: &[u8]) -> PyResult<State> {
        let m = model.inner.clone();
        let state = py
            .detach(|| performer::State::from_bytes(&m, data))
            .map_err(to_py)?;
        Ok(State {
            model: m,
            inner: Mutex::new(Some(state)),
        })
    }

    fn __repr__(&self) -> String {
        match self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(s) => format!("State(position={})", s.position()),
            None => "State(<in use by a generation>)".to_string(),
        }
    }
}

/// A running generation: iterate it for `str` pieces. `close()` (or dropping it) stops it.
///
/// The generation runs on a thread of its own that computes a piece when Python asks for the
/// next one (the GIL released while it works), so a state given to `Model.generate` holds no
/// more than what the pieces taken needed.
#[pyclass(module = "performer")]
struct TextStream {
    /// Asks the thread for the next piece; dropping it ends the thread.
    requests: Option<SyncSender<()>>,
    replies: Mutex<Receiver<Option<performer::Result<String>>>>,
    worker: Option<JoinHandle<performer::State>>,
    /// The Python state the generation runs on, given its state back at the end.
    owner: Option<Py<State>>,
    /// Text pieces returned so far.
    pieces: usize,
}

impl TextStream {
    fn start(
        py: Python<'_>,
        model: Arc<performer::Model>,
        mut state: performer::State,
        prompt: Vec<u32>,
        options: GenerateOptions,
        owner: Option<Py<State>>,
    ) -> PyResult<Self> {
        let (requests, request_rx) = sync_channel::<()>(0);
        let (reply_tx, replies) = sync_channel(1);
        let (ready_tx, ready) = sync_channel::<performer::Result<()>>(1);
        let worker = std::thread::Builder::new()
            .name("performer-generate".into())
            .spawn(move || {
                // The prompt is ingested at once (the caller waits, so that an error is
                // raised by `generate` itself); each piece after that on request.
                let mut generation = match Generation::new(&model, &mut state, &prompt, options) {
                    Ok(g) => g,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return state;
                    }
                };
                if ready_tx.send(Ok(())).is_err() || request_rx.recv().is_err() {
                    drop(generation);
                    return state;
                }
                loop {
                    let piece = generation.next();
                    let end = !matches!(piece, Some(Ok(_)));
                    if reply_tx.send(piece).is_err() || end || request_rx.recv().is_err() {
                        break;
                    }
                }
                drop(generation);
                state
            })
            .map_err(|e| {
                to_py(performer::Error::io(
                    "<generation thread>",
                    std::io::Error::other(e),
                ))
            })?;
        let mut stream = TextStream {
            requests: Some(requests),
            replies: Mutex::new(replies),
            worker: Some(worker),
            owner,
            pieces: 0,
        };
        let started = py.detach(move || ready.recv());
        match started {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => {
                stream.finish(py);
                Err(to_py(e))
            }
            Err(_) => {
                stream.finish(py);
                Err(to_py(performer::Error::io(
                    "<generation thread>",
                    std::io::Error::other("the generation thread ended unexpectedly"),
                )))
            }
        }
    }

    /// Ends the generation: stops the thread and gives the state back to its owner.
    fn finish(&mut self, py: Python<'_>) {
        self.requests = None;
        if let Some(worker) = self.worker.take() {
            let state = py.detach(|| worker.join());
            if let (Ok(state), Some(owner)) = (state, self.owner.take()) {
                owner.get().put_back(state);
            }
        }
    }
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        let Some(requests) = &self.requests else {
            return Ok(None);
        };
        let replies = &self.replies;
        let reply = py.detach(|| {
            requests.send(()).ok()?;
            replies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv()
                .ok()
        });
        match reply.flatten() {
            Some(Ok(text)) => {
                self.pieces += 1;
                Ok(Some(text))
            }
            Some(Err(e)) => {
                self.finish(py);
                Err(to_py(e))
            }
            None => {
                self.finish(py);
                Ok(None)
            }
        }
    }

    /// Stops the generation now (the state, if one was given, keeps what was generated).
    fn close(&mut self, py: Python<'_>) {
        self.finish(py);
    }

    /// Text pieces returned so far.
    #[getter]
    fn pieces(&self) -> usize {
        self.pieces
    }
}

impl Drop for TextStream {
    fn drop(&mut self) {
        if self.worker.is_some() {
            Python::attach(|py| self.finish(py));
        }
    }
}

/// Streaming CPU inference for causal Performer (FAVOR+) language models.
#[pymodule]
#[pyo3(name = "performer")]
fn performer_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let errors = errors(py)?;
    m.add("PerformerError", errors.base.bind(py))?;
    m.add("PerformerIOError", errors.io.bind(py))?;
    m.add("PerformerValueError", errors.value.bind(py))?;
    m.add_class::<Model>()?;
    m.add_class::<State>()?;
    m.add_class::<TextStream>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
