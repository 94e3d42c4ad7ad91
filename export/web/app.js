// The page: a drawing pad and image drop in, the predicted digit and ten probability bars out.
// Everything runs here; the only requests are for the page's own files and the model.
import { MAX_PIXELS, flatten, toMnist } from './preprocess.js';
import { loadModel, ortVersion } from './model.js';

const $ = (id) => document.getElementById(id);
const pad = $('pad'), padContext = pad.getContext('2d', { willReadFrequently: true });
const INK = 22; // stroke width on the 280 px pad: about MNIST's once scaled into its 20x20 box

let model = null;
const bars = [];

// What the tests (and a curious user, from the console) can drive without the mouse.
const demo = window.mnistDemo = {
  ready: null,
  last: null,
  use: (url) => use(url),
  /** Base64 of n * 784 uint8 white-on-black pixels -> {labels, probs}, as mnist_edge.Classifier.predict. */
  classify: async (base64) => (await demo.ready).predict(Uint8Array.from(atob(base64), (c) => c.charCodeAt(0))),
};

function setup() {
  for (let digit = 0; digit < 10; digit++) {
    const li = document.createElement('li');
    li.innerHTML = `<span class="label">${digit}</span><span class="bar"><span class="fill"></span></span><span class="value"></span>`;
    $('bars').append(li);
    bars.push(li);
  }
  clearPad();
  $('clear').addEventListener('click', () => { clearPad(); showSeen(new Uint8Array(784)); showResult(null); });
  $('file').addEventListener('change', (event) => openImage(event.target.files[0]));
  // A model that fails to load is reported on the status line; nothing else to do with the error.
  $('model').addEventListener('change', (event) => use(event.target.value).catch(() => {}));
  setupDrawing();
  setupDrop();
  use($('model').value).catch(() => {});
}

function use(url) {
  $('model').value = url;
  status(`loading ${url}…`);
  demo.ready = loadModel(url);
  demo.ready.then((loaded) => {
    model = loaded;
    status(`${url.split('/').pop()} (${(loaded.size / 1e6).toFixed(2)} MB) in onnxruntime-web ${ortVersion}, wasm, 1 thread. Nothing leaves this page.`);
    if (demo.last) classify(Uint8Array.from(demo.last.pixels), demo.last.source);
  }, (error) => status(error.message, true));
  return demo.ready.then(() => undefined);
}

function status(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

function clearPad() {
  padContext.fillStyle = '#fff';
  padContext.fillRect(0, 0, pad.width, pad.height);
  demo.last = null;
}

function setupDrawing() {
  let drawing = false;
  const at = (event) => [event.offsetX * pad.width / pad.clientWidth, event.offsetY * pad.height / pad.clientHeight];
  pad.addEventListener('pointerdown', (event) => {
    drawing = true;
    pad.setPointerCapture(event.pointerId);
    Object.assign(padContext, { strokeStyle: '#000', lineWidth: INK, lineCap: 'round', lineJoin: 'round' });
    padContext.beginPath();
    padContext.moveTo(...at(event));
    padContext.lineTo(...at(event)); // a tap leaves a dot
    padContext.stroke();
  });
  pad.addEventListener('pointermove', (event) => {
    if (!drawing) return;
    padContext.lineTo(...at(event));
    padContext.stroke();
  });
  const end = () => {
    if (!drawing) return;
    drawing = false;
    classifyImage(padContext.getImageData(0, 0, pad.width, pad.height), 'pad');
  };
  pad.addEventListener('pointerup', end);
  pad.addEventListener('pointercancel', end);
}

function setupDrop() {
  // A file dropped beside the pad must not make the browser navigate away to it.
  for (const type of ['dragover', 'drop']) window.addEventListener(type, (event) => event.preventDefault());
  pad.addEventListener('dragover', () => pad.classList.add('dragging'));
  pad.addEventListener('dragleave', () => pad.classList.remove('dragging'));
  pad.addEventListener('drop', (event) => {
    pad.classList.remove('dragging');
    openImage(event.dataTransfer.files[0]);
  });
}

async function openImage(file) {
  if (!file) return;
  let bitmap;
  try {
    // The file's own pixels, as Pillow reads them: no colour management, no premultiplied alpha.
    bitmap = await createImageBitmap(file, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  } catch {
    status(`${file.name}: not a readable image. Fix: open a PNG or JPEG.`, true);
    return;
  }
  const { width, height } = bitmap;
  if (width * height > MAX_PIXELS) {
    status(`${file.name}: ${width}x${height} is refused as a possible decompression bomb. Fix: scale the image down; a digit needs no more than a few hundred pixels a side.`, true);
    return;
  }
  const context = new OffscreenCanvas(width, height).getContext('2d', { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  clearPad();
  const fit = Math.min(pad.width / width, pad.height / height);
  padContext.drawImage(bitmap, (pad.width - width * fit) / 2, (pad.height - height * fit) / 2, width * fit, height * fit);
  await classifyImage(context.getImageData(0, 0, width, height), file.name);
}

async function classifyImage(imageData, source) {
  await classify(toMnist(flatten(imageData), imageData.width, imageData.height), source);
}

async function classify(pixels, source) {
  const loaded = await demo.ready;
  const { labels, probs } = await loaded.predict(pixels);
  demo.last = { source, pixels: Array.from(pixels), input: Array.from(loaded.normalize(pixels)), label: labels[0], probs: probs[0] };
  showSeen(pixels);
  showResult(labels[0], probs[0]);
}

function showSeen(pixels) {
  const context = $('seen').getContext('2d');
  const image = context.createImageData(28, 28);
  pixels.forEach((p, i) => image.data.set([p, p, p, 255], 4 * i));
  context.putImageData(image, 0, 0);
}

function showResult(label, probs = []) {
  $('digit').textContent = label === null ? '–' : model.labels[label];
  $('confidence').textContent = label === null ? '' : `p = ${probs[label].toFixed(3)}`;
  bars.forEach((li, digit) => {
    const p = probs[digit] ?? 0;
    li.classList.toggle('top', digit === label);
    li.querySelector('.fill').style.width = `${(100 * p).toFixed(1)}%`;
    li.querySelector('.value').textContent = label === null ? '' : `${(100 * p).toFixed(1)}%`;
  });
}

setup();
