// node caption.mjs EXPORT_DIR IMAGE TASK_TOKEN MAX_NEW_TOKENS -> one JSON line: generated token ids and text.
// Loads the folder the way a transformers.js user loads a published Florence-2 ONNX model, offline.
import path from 'node:path';
import { env, AutoProcessor, Florence2ForConditionalGeneration, RawImage } from '@huggingface/transformers';

const [folder, imagePath, task, maxNewTokens] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder));
const name = path.basename(path.resolve(folder));

const model = await Florence2ForConditionalGeneration.from_pretrained(name, { dtype: 'fp32', device: 'cpu' });
const processor = await AutoProcessor.from_pretrained(name);
const image = await RawImage.read(imagePath);
const inputs = await processor(image, processor.construct_prompts(task));
const ids = await model.generate({ ...inputs, max_new_tokens: Number(maxNewTokens), do_sample: false, num_beams: 1 });
const row = ids.tolist()[0].map(Number);
const text = processor.batch_decode(ids, { skip_special_tokens: false })[0];
console.log(JSON.stringify({ ids: row, text }));
