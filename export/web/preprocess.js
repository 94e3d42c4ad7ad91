// The Python edge runtime's preprocessing (export/mnist_edge/inputs.py), step for step, so
// the page feeds the model the same 28x28 pixels as `mnist-dist predict` does for a file.
// Float32 steps use Math.fround where numpy computes in float32, and rounding is Python's
// (half to even), because a one-pixel shift of the centre of mass changes the whole input.

// Pillow's decompression-bomb limit (twice Image.MAX_IMAGE_PIXELS): inputs.py refuses above it.
export const MAX_PIXELS = 2 * 89478485;

/** Grey pixels (Float32Array, 0-255) of RGBA ImageData, as inputs.flatten does for a PIL image. */
export function flatten({ data, width, height }) {
  const n = width * height;
  const grey = new Float32Array(n);
  let transparent = false;
  for (let i = 0; i < n; i++) {
    const p = 4 * i;
    grey[i] = luma(data[p], data[p + 1], data[p + 2]);
    if (data[p + 3] !== 255) transparent = true;
  }
  // A browser decodes every image to RGBA; an opaque one is what PIL's convert("L") gives.
  if (!transparent) return grey;
  // Transparency is composited onto the opposite of the ink (see inputs.flatten).
  let inkSum = 0, inkCount = 0;
  const alpha = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    alpha[i] = Math.fround(data[4 * i + 3] / 255);
    if (alpha[i] > 0.5) { inkSum += grey[i]; inkCount++; }
  }
  const background = inkCount && inkSum / inkCount < 128 ? 255 : 0;
  for (let i = 0; i < n; i++) {
    grey[i] = Math.fround(Math.fround(grey[i] * alpha[i]) + Math.fround(background * Math.fround(1 - alpha[i])));
  }
  return grey;
}

/** PIL's RGB -> L: ITU-R 601-2 luma in 16-bit fixed point (libImaging/Convert.c, L24). */
function luma(r, g, b) {
  return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >>> 16;
}

/** Any-size grey image (Float32Array 0-255) -> Uint8Array(784), white digit on black (inputs.to_mnist). */
export function toMnist(input, width, height) {
  let grey = input;
  if (borderMean(grey, width, height) > 127) { // black-on-white: invert to MNIST's white-on-black
    grey = grey.map((v) => 255 - v);
  }
  let max = 0;
  for (const v of grey) if (v > max) max = v;
  if (max <= 0) return new Uint8Array(784);
  const threshold = Math.fround(Math.fround(0.2) * max);
  let top = height, bottom = -1, left = width, right = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (grey[y * width + x] > threshold) {
        top = Math.min(top, y); bottom = Math.max(bottom, y);
        left = Math.min(left, x); right = Math.max(right, x);
      }
    }
  }
  const cw = right - left + 1, ch = bottom - top + 1;
  const crop = new Uint8Array(cw * ch); // numpy's astype(uint8) truncates
  for (let y = 0; y < ch; y++) {
    for (let x = 0; x < cw; x++) crop[y * cw + x] = Math.trunc(grey[(y + top) * width + x + left]);
  }
  const scale = 20 / Math.max(cw, ch);
  const sw = Math.max(1, roundHalfEven(cw * scale)), sh = Math.max(1, roundHalfEven(ch * scale));
  const small = resizeLanczos(crop, cw, ch, sw, sh);
  const canvas = new Uint8Array(784);
  const y0 = Math.floor((28 - sh) / 2), x0 = Math.floor((28 - sw) / 2);
  for (let y = 0; y < sh; y++) canvas.set(small.subarray(y * sw, (y + 1) * sw), (y + y0) * 28 + x0);
  return centreOfMass(canvas);
}

function borderMean(grey, width, height) {
  let sum = 0;
  for (let x = 0; x < width; x++) sum += grey[x] + grey[(height - 1) * width + x];
  for (let y = 0; y < height; y++) sum += grey[y * width] + grey[y * width + width - 1];
  return Math.fround(sum / (2 * width + 2 * height));
}

/** Shift (with wrap-around, as np.roll) so the centre of mass lands on the frame's centre. */
function centreOfMass(canvas) {
  let total = 0, sy = 0, sx = 0;
  for (let i = 0; i < 784; i++) {
    total += canvas[i]; sy += Math.floor(i / 28) * canvas[i]; sx += (i % 28) * canvas[i];
  }
  if (total === 0) return canvas;
  const dy = roundHalfEven(13.5 - sy / total), dx = roundHalfEven(13.5 - sx / total);
  const out = new Uint8Array(784);
  for (let y = 0; y < 28; y++) {
    for (let x = 0; x < 28; x++) out[mod(y + dy, 28) * 28 + mod(x + dx, 28)] = canvas[y * 28 + x];
  }
  return out;
}

const mod = (a, n) => ((a % n) + n) % n;

/** Python's round(): ties go to the even neighbour. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// ---- Pillow's Image.resize(size, Image.LANCZOS) for mode "L", ported from libImaging/Resample.c:
// two separable passes with 8-bit fixed-point coefficients, each rounded to uint8.
const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;
const SUPPORT = 3;

function sinc(x) {
  if (x === 0) return 1;
  x *= Math.PI;
  return Math.sin(x) / x;
}

function lanczos(x) {
  return -SUPPORT <= x && x < SUPPORT ? sinc(x) * sinc(x / SUPPORT) : 0;
}

/** For each output index: [first input index, integer weights], as precompute_coeffs + normalize_coeffs_8bpc. */
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = SUPPORT * filterScale;
  const inverse = 1 / filterScale; // multiplied, not divided, as in C: the last bit decides some weights
  const result = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    const weights = [];
    let sum = 0;
    for (let x = 0; x < xmax; x++) {
      const w = lanczos((x + xmin - center + 0.5) * inverse);
      weights.push(w);
      sum += w;
    }
    const ints = weights.map((w) => {
      const k = sum !== 0 ? w / sum : w;
      return Math.trunc(k < 0 ? -0.5 + k * ONE : 0.5 + k * ONE);
    });
    result.push([xmin, ints]);
  }
  return result;
}

function clip8(ss) {
  return Math.min(255, Math.max(0, Math.floor(ss / ONE)));
}

/** uint8 (h, w) -> uint8 (outH, outW), bit for bit what Pillow 13 gives. */
export function resizeLanczos(src, w, h, outW, outH) {
  let img = { data: src, width: w, height: h };
  const horizontal = () => { if (outW !== w) img = resampleRows(img, outW); };
  const vertical = () => { if (outH !== h) img = transpose(resampleRows(transpose(img), outH)); };
  // Pillow 13 runs the vertical pass first when the height shrinks more than twice as much
  // as the width; older Pillow always starts with the horizontal one (see README.md).
  if (h - outH > 0 && h - outH > (w - outW) * 2) { vertical(); horizontal(); } else { horizontal(); vertical(); }
  return img.data === src ? src.slice() : img.data;
}

/** One 8-bit pass: each row resampled to `outWidth` pixels. */
function resampleRows({ data, width, height }, outWidth) {
  const coeffs = coefficients(width, outWidth);
  const out = new Uint8Array(outWidth * height);
  for (let y = 0; y < height; y++) {
    for (let xx = 0; xx < outWidth; xx++) {
      const [xmin, k] = coeffs[xx];
      let ss = ONE / 2;
      for (let x = 0; x < k.length; x++) ss += data[y * width + xmin + x] * k[x];
      out[y * outWidth + xx] = clip8(ss);
    }
  }
  return { data: out, width: outWidth, height };
}

function transpose({ data, width, height }) {
  const out = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) out[x * height + y] = data[y * width + x];
  return { data: out, width: height, height: width };
}
