// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package org.pytorch.executorch;
public class Module {
  public static Module load(String modelPath) { return null; }
  public EValue[] forward(EValue... inputs) { return null; }
  public void destroy() {}
}
