// Part of the edgetl bundle: runs the bundled .pte with ExecuTorch's Android Module (org.pytorch:executorch-android).
package ai.edgetl.classifier

import android.content.Context
import android.graphics.Bitmap
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import java.io.Closeable
import java.io.File

/**
 * Classifies a Bitmap exactly as edgetl verified the model: bilinear resize to the input size, RGB,
 * (pixel - mean) / std per channel, NHWC float32 (an int8 .pte quantizes inside the graph).
 * Not thread-safe: use one instance per thread.
 */
class ImageClassifier(context: Context) : Closeable {
    val labels: List<String> = context.assets.open(ModelSpec.LABELS_FILE).bufferedReader().readLines()
        .filter { it.isNotEmpty() }
    private val module: Module = Module.load(copyAsset(context, ModelSpec.MODEL_FILE).absolutePath)
    private val pixels = IntArray(ModelSpec.INPUT_WIDTH * ModelSpec.INPUT_HEIGHT)
    private val shape = longArrayOf(1, ModelSpec.INPUT_HEIGHT.toLong(), ModelSpec.INPUT_WIDTH.toLong(), 3)

    init {
        require(labels.size == ModelSpec.NUM_CLASSES) { "labels.txt has ${labels.size} lines, model has ${ModelSpec.NUM_CLASSES} classes" }
    }

    /** Top-k labels with softmax probabilities, best first. */
    fun classify(bitmap: Bitmap, k: Int = 3): List<Category> = Preprocessing.topK(outputs(bitmap), labels, k)

    /** Raw outputs, one per label: see ModelSpec.OUTPUT_KIND. */
    fun outputs(bitmap: Bitmap): FloatArray {
        val w = ModelSpec.INPUT_WIDTH
        val h = ModelSpec.INPUT_HEIGHT
        val scaled = if (bitmap.width == w && bitmap.height == h) bitmap else Bitmap.createScaledBitmap(bitmap, w, h, true)
        scaled.getPixels(pixels, 0, w, 0, 0, w, h)
        val input = Tensor.fromBlob(Preprocessing.normalize(pixels), shape)
        return module.forward(EValue.from(input))[0].toTensor().dataAsFloatArray
    }

    override fun close() = module.destroy()

    private companion object {
        /** ExecuTorch loads from a file path, so the asset is copied out once (and again when it changes). */
        fun copyAsset(context: Context, name: String): File {
            val target = File(context.filesDir, "edgetl-" + name)
            val size = context.assets.openFd(name).use { it.length }
            if (!target.exists() || target.length() != size) {
                context.assets.open(name).use { input -> target.outputStream().use { input.copyTo(it) } }
            }
            return target
        }
    }
}
