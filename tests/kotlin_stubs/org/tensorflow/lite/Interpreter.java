// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package org.tensorflow.lite;
public final class Interpreter implements AutoCloseable {
  public static class Options { public Options setNumThreads(int n) { return this; } }
  public Interpreter(java.nio.ByteBuffer model, Options options) {}
  public void run(Object input, Object output) {}
  public void close() {}
}
