// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package android.content;
public abstract class Context {
  public abstract android.content.res.AssetManager getAssets();
  public abstract java.io.File getFilesDir();
}
