// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package androidx.test.platform.app;
public class InstrumentationRegistry {
  public static android.app.Instrumentation getInstrumentation() { return null; }
}
