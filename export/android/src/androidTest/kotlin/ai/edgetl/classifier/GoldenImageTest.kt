// Part of the edgetl bundle: on-device self-test. The golden images and what the verified model gave for
// them on the host are in src/androidTest/assets/golden/ (expected.json); run with
// ./gradlew :edgetl-classifier:connectedAndroidTest
package ai.edgetl.classifier

import android.graphics.BitmapFactory
import androidx.test.ext.junit.runners.AndroidJUnit4
import androidx.test.platform.app.InstrumentationRegistry
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import org.junit.runner.RunWith
import kotlin.math.abs

@RunWith(AndroidJUnit4::class)
class GoldenImageTest {
    @Test
    fun goldenImagesGiveTheHostTopK() {
        val testAssets = InstrumentationRegistry.getInstrumentation().context.assets
        val target = InstrumentationRegistry.getInstrumentation().targetContext
        val expected = JSONObject(testAssets.open("golden/expected.json").bufferedReader().readText())
        val tolerance = expected.getDouble("tolerance").toFloat()
        val images = expected.getJSONArray("images")
        ImageClassifier(target).use { classifier ->
            for (i in 0 until images.length()) {
                val image = images.getJSONObject(i)
                val bitmap = testAssets.open("golden/" + image.getString("file")).use { BitmapFactory.decodeStream(it) }
                val want = image.getJSONArray("top_k")
                val got = classifier.classify(bitmap, want.length())
                assertEquals(image.getString("file") + ": top-1", want.getJSONObject(0).getInt("index").toLong(), got[0].index.toLong())
                for (j in 0 until want.length()) {
                    val entry = want.getJSONObject(j)
                    val score = Preprocessing.probabilities(classifier.outputs(bitmap))[entry.getInt("index")]
                    val diff = abs(score - entry.getDouble("score").toFloat())
                    assertTrue(image.getString("file") + ": score of " + entry.getString("label") + " off by " + diff, diff <= tolerance)
                }
            }
        }
    }
}
