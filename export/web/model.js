// A verified export's model in onnxruntime-web (wasm), used as mnist_edge.Classifier uses
// ONNX Runtime: the pixel normalisation and the session settings come from the model's own
// metadata, so the page carries no copy of the training constants.
import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';

const META_NORMALIZATION = 'mnist_dist.normalization';
const META_LABELS = 'mnist_dist.labels';
const META_SESSION = 'mnist_dist.ort_session';

// One thread, as the Python runtime's default; more would also need cross-origin isolation.
ort.env.wasm.numThreads = 1;

export const ortVersion = ort.env.versions.web;

/** Fetch a model from the page's own origin and open it; errors say what to fix. */
export async function loadModel(url) {
  const response = await fetch(url);
  if (!response.ok) {
    throw new Error(`${url}: ${response.status} ${response.statusText}. Fix: serve a verified export with mnist-dist serve-demo --run RUN.`);
  }
  const bytes = new Uint8Array(await response.arrayBuffer());
  const meta = readMetadata(bytes, url);
  const missing = [META_NORMALIZATION, META_LABELS].filter((key) => !(key in meta));
  if (missing.length) {
    throw new Error(`${url}: the model lacks the metadata ${missing.join(', ')} that says how to scale pixels. Fix: use a model written by mnist-dist export.`);
  }
  // The int8 model names optimizers to switch off (see export.quantize_int8): speed only, same answers.
  const disabled = JSON.parse(meta[META_SESSION] ?? '{}').disabled_optimizers ?? [];
  const options = { executionProviders: ['wasm'] };
  if (disabled.length) options.extra = { optimization: { disable_specified_optimizers: disabled.join(';') } };
  const session = await ort.InferenceSession.create(bytes, options);
  return new Model(session, JSON.parse(meta[META_NORMALIZATION]), JSON.parse(meta[META_LABELS]), bytes.length);
}

export class Model {
  constructor(session, normalization, labels, size) {
    this.session = session;
    this.labels = labels;
    this.size = size;
    // numpy's float32 arithmetic, (pixel - offset) / scale, tabulated for the 256 pixel values.
    const offset = Math.fround(normalization.offset), scale = Math.fround(normalization.scale);
    this.table = Float32Array.from({ length: 256 }, (_, p) => Math.fround(p - offset) / scale);
  }

  /** uint8 white-on-black pixels (n * 784) -> the model's float32 NHWC input. */
  normalize(pixels) {
    return Float32Array.from(pixels, (p) => this.table[p]);
  }

  /** {labels, probs} for n images of 784 uint8 pixels each; softmax in float64 as the Python runtime. */
  async predict(pixels) {
    const n = pixels.length / 784;
    const input = new ort.Tensor('float32', this.normalize(pixels), [n, 28, 28, 1]);
    const outputs = await this.session.run({ [this.session.inputNames[0]]: input });
    const logits = outputs[this.session.outputNames[0]].data;
    const probs = [], labels = [];
    for (let i = 0; i < n; i++) {
      const row = Array.from(logits.subarray(i * 10, i * 10 + 10));
      const max = Math.max(...row);
      const exp = row.map((v) => Math.exp(v - max));
      const sum = exp.reduce((a, b) => a + b, 0);
      probs.push(exp.map((v) => v / sum));
      labels.push(row.indexOf(max));
    }
    return { labels, probs };
  }
}

/** ModelProto.metadata_props (field 14: key 1, value 2), read straight from the protobuf bytes. */
export function readMetadata(bytes, name = 'model') {
  const text = new TextDecoder();
  const meta = {};
  for (const [field, start, end] of lengthFields(bytes, 0, bytes.length, name)) {
    if (field !== 14) continue;
    const entry = {};
    for (const [f, s, e] of lengthFields(bytes, start, end, name)) entry[f] = text.decode(bytes.subarray(s, e));
    meta[entry[1] ?? ''] = entry[2] ?? '';
  }
  return meta;
}

/** [field, start, end] of each length-delimited field in bytes[pos, end); other wire types are skipped. */
function* lengthFields(bytes, pos, end, name) {
  while (pos < end) {
    let tag, length;
    [tag, pos] = varint(bytes, pos);
    const wire = tag % 8, field = Math.floor(tag / 8);
    if (wire === 0) [, pos] = varint(bytes, pos);
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      [length, pos] = varint(bytes, pos);
      if (pos + length <= end) yield [field, pos, pos + length];
      pos += length;
    } else pos = Infinity;
    if (pos > end) throw new Error(`${name}: not an ONNX model (its bytes do not parse). Fix: pass model.onnx or model.int8.onnx from mnist-dist export.`);
  }
}

function varint(bytes, pos) {
  let value = 0;
  for (let shift = 1; pos < bytes.length; shift *= 128) {
    const byte = bytes[pos++];
    value += (byte & 127) * shift;
    if (byte < 128) return [value, pos];
  }
  return [value, Infinity];
}
