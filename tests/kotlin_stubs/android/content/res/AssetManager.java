// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package android.content.res;
public final class AssetManager {
  public java.io.InputStream open(String name) throws java.io.IOException { throw new UnsupportedOperationException(); }
  public AssetFileDescriptor openFd(String name) throws java.io.IOException { throw new UnsupportedOperationException(); }
}
