// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package android.app;
public class Instrumentation {
  public android.content.Context getContext() { return null; }
  public android.content.Context getTargetContext() { return null; }
}
