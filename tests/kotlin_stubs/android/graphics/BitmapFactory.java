// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package android.graphics;
public class BitmapFactory {
  public static Bitmap decodeStream(java.io.InputStream is) { return null; }
}
