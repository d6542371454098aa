// Part of the edgetl bundle: pure Kotlin (no Android types), so the same arithmetic runs in unit tests.
package ai.edgetl.classifier

import kotlin.math.exp
import kotlin.math.roundToInt

/** One class: its index in labels.txt, its label, its softmax probability. */
data class Category(val index: Int, val label: String, val score: Float)

object Preprocessing {
    /** ARGB pixels (as Bitmap.getPixels gives them), already INPUT_WIDTH x INPUT_HEIGHT, to NHWC floats. */
    fun normalize(argb: IntArray): FloatArray {
        val out = FloatArray(argb.size * 3)
        for (i in argb.indices) {
            val p = argb[i]
            out[3 * i] = (((p shr 16) and 0xFF) - ModelSpec.PIXEL_MEAN[0]) / ModelSpec.PIXEL_STD[0]
            out[3 * i + 1] = (((p shr 8) and 0xFF) - ModelSpec.PIXEL_MEAN[1]) / ModelSpec.PIXEL_STD[1]
            out[3 * i + 2] = ((p and 0xFF) - ModelSpec.PIXEL_MEAN[2]) / ModelSpec.PIXEL_STD[2]
        }
        return out
    }

    /** Float tensor to int8/uint8 bytes with the input tensor's scale and zero point (round half away). */
    fun quantize(x: FloatArray, low: Int, high: Int): ByteArray {
        val out = ByteArray(x.size)
        for (i in x.indices) {
            val q = (x[i] / ModelSpec.INPUT_SCALE).roundToInt() + ModelSpec.INPUT_ZERO_POINT
            out[i] = q.coerceIn(low, high).toByte()
        }
        return out
    }

    fun dequantize(q: ByteArray, signed: Boolean): FloatArray = FloatArray(q.size) { i ->
        val v = if (signed) q[i].toInt() else q[i].toInt() and 0xFF
        (v - ModelSpec.OUTPUT_ZERO_POINT) * ModelSpec.OUTPUT_SCALE
    }

    fun softmax(logits: FloatArray): FloatArray {
        var top = Float.NEGATIVE_INFINITY
        for (v in logits) if (v > top) top = v
        val e = FloatArray(logits.size) { exp((logits[it] - top).toDouble()).toFloat() }
        val sum = e.sum()
        return FloatArray(e.size) { e[it] / sum }
    }

    /** The model's outputs as probabilities (softmax unless the model already ends in one). */
    fun probabilities(outputs: FloatArray): FloatArray =
        if (ModelSpec.OUTPUT_KIND == "probabilities") outputs else softmax(outputs)

    fun topK(outputs: FloatArray, labels: List<String>, k: Int): List<Category> {
        val p = probabilities(outputs)
        return p.indices.sortedByDescending { p[it] }.take(k).map { Category(it, labels[it], p[it]) }
    }
}
