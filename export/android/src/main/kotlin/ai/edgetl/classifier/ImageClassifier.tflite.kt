// Part of the edgetl bundle: runs the bundled .tflite with LiteRT's Interpreter (com.google.ai.edge.litert).
package ai.edgetl.classifier

import android.content.Context
import android.graphics.Bitmap
import org.tensorflow.lite.Interpreter
import java.io.Closeable
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.MappedByteBuffer
import java.nio.channels.FileChannel

/**
 * Classifies a Bitmap exactly as edgetl verified the model: bilinear resize to the input size, RGB,
 * (pixel - mean) / std per channel, quantized with the input tensor's scale and zero point for int8 inputs.
 * Not thread-safe: use one instance per thread.
 */
class ImageClassifier(context: Context, threads: Int = 4) : Closeable {
    val labels: List<String> = context.assets.open(ModelSpec.LABELS_FILE).bufferedReader().readLines()
        .filter { it.isNotEmpty() }
    private val interpreter = Interpreter(mapAsset(context, ModelSpec.MODEL_FILE), Interpreter.Options().setNumThreads(threads))
    private val pixels = IntArray(ModelSpec.INPUT_WIDTH * ModelSpec.INPUT_HEIGHT)

    init {
        require(labels.size == ModelSpec.NUM_CLASSES) { "labels.txt has ${labels.size} lines, model has ${ModelSpec.NUM_CLASSES} classes" }
    }

    /** Top-k labels with softmax probabilities, best first. */
    fun classify(bitmap: Bitmap, k: Int = 3): List<Category> = Preprocessing.topK(outputs(bitmap), labels, k)

    /** Raw outputs (dequantized for int8), one per label: see ModelSpec.OUTPUT_KIND. */
    fun outputs(bitmap: Bitmap): FloatArray {
        val x = Preprocessing.normalize(readPixels(bitmap))
        val input = when (ModelSpec.INPUT_DTYPE) {
            "int8" -> direct(x.size).put(Preprocessing.quantize(x, -128, 127))
            "uint8" -> direct(x.size).put(Preprocessing.quantize(x, 0, 255))
            else -> direct(4 * x.size).also { it.asFloatBuffer().put(x) }
        }
        input.rewind()
        return when (ModelSpec.OUTPUT_DTYPE) {
            "int8", "uint8" -> {
                val out = direct(ModelSpec.NUM_CLASSES)
                interpreter.run(input, out)
                out.rewind()
                val bytes = ByteArray(ModelSpec.NUM_CLASSES)
                out.get(bytes)
                Preprocessing.dequantize(bytes, ModelSpec.OUTPUT_DTYPE == "int8")
            }
            else -> {
                val out = direct(4 * ModelSpec.NUM_CLASSES)
                interpreter.run(input, out)
                out.rewind()
                val logits = FloatArray(ModelSpec.NUM_CLASSES)
                out.asFloatBuffer().get(logits)
                logits
            }
        }
    }

    private fun readPixels(bitmap: Bitmap): IntArray {
        val w = ModelSpec.INPUT_WIDTH
        val h = ModelSpec.INPUT_HEIGHT
        val scaled = if (bitmap.width == w && bitmap.height == h) bitmap else Bitmap.createScaledBitmap(bitmap, w, h, true)
        scaled.getPixels(pixels, 0, w, 0, 0, w, h)
        return pixels
    }

    override fun close() = interpreter.close()

    private companion object {
        fun direct(bytes: Int): ByteBuffer = ByteBuffer.allocateDirect(bytes).order(ByteOrder.nativeOrder())

        /** Memory-maps the model from the APK; needs `noCompress` for the extension (build.gradle.kts). */
        fun mapAsset(context: Context, name: String): MappedByteBuffer {
            val fd = context.assets.openFd(name)
            FileInputStream(fd.fileDescriptor).use { stream ->
                return stream.channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
            }
        }
    }
}
